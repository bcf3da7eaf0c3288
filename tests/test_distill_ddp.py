"""DistillationTrainer under `accelerate launch` with 2 CPU processes (gloo): the same update as one process
with the whole batch (token counts gathered across processes), and the same parameters on both ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "distill_ddp.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.is_file():
        pytest.fail(f"accelerate's launcher is missing beside {sys.executable}")
    ddp = subprocess.run(
        # --multi_gpu selects torchrun; the script's use_cpu=True makes accelerate run MULTI_CPU over gloo.
        [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(SCRIPT), str(tmp_path / "ddp"), "2"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one"), "4"], env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "ddp" / "rank0.safetensors")), load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    one = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    assert any(k.startswith("distill_projector.") for k in one)
    for k in one:
        assert torch.equal(r0[k], r1[k]), f"ranks differ at {k}"
        assert torch.allclose(r0[k], one[k], atol=1e-6), f"2 processes x batch 2 != 1 process x batch 4 at {k}"
