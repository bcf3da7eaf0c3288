"""Stock transformers (no hf_compress import) on transformers' own bitnet format, for tests/test_bitnet.py.

    python stock_bitnet.py load DIR IDS.json OUT.safetensors   # from_pretrained(DIR), logits of IDS -> OUT
    python stock_bitnet.py save FLOAT_DIR DIR                   # ternary-quantize FLOAT_DIR with transformers' own
                                                                # pack_weights / BitLinear, save_pretrained(DIR)
Runs with TORCHDYNAMO_DISABLE=1 (transformers' BitLinear is torch.compile'd; eager here)."""

import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitNetQuantConfig
from transformers.integrations.bitnet import BitLinear, pack_weights, replace_with_bitnet_linear

assert "hf_compress" not in sys.modules
cmd, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
if cmd == "load":
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    assert any(isinstance(m, BitLinear) for m in model.modules())
    ids = torch.tensor(json.loads(open(dst).read()))
    with torch.no_grad():
        save_file({"logits": model(ids).logits.contiguous()}, sys.argv[4])
else:
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    floats = {n: (m.weight.detach().clone(), m.bias) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    cfg = BitNetQuantConfig(modules_to_not_convert=["lm_head"])
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=cfg)
    for name, m in model.named_modules():
        if isinstance(m, BitLinear):
            w, _ = floats[name]
            scale = 1.0 / w.abs().mean().clamp(min=1e-5)  # bitlinear divides by weight_scale
            codes = (w * scale).round().clamp(-1, 1)
            m.weight = pack_weights(codes.clone())
            m.weight_scale = scale.reshape(1).to(m.weight_scale.dtype if m.weight_scale.device.type != "meta" else torch.float32)
    model.config.quantization_config = cfg
    model.save_pretrained(dst)
