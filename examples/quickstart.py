"""Quantize a model on load, generate, save, reload and dequantize (the README's Python example, runnable).

    python examples/quickstart.py [MODEL]   # default: ../shared/models/pydoc-llama-6m
"""

import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_compress

model_path = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[2] / "shared/models/pydoc-llama-6m")
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=hf_compress.RTNConfig(bits=4, group_size=128))

inputs = tokenizer("The :mod:`json` module", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
print(tokenizer.decode(out[0], skip_special_tokens=True))

with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp)  # packed, no requantization
    with torch.inference_mode():
        same = torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
    print("reloaded logits identical:", same)

model.dequantize()
print("dequantized:", type(model.model.layers[0].mlp.down_proj).__name__)
