"""CUDA-only checks (scripts/gpu_check.sh runs them with ``-m gpu``; the CPU suite deselects them):
8-bit AdamW from bitsandbytes, FSDP2 over NCCL on one GPU. QLoRA is in test_lora_everywhere.py; the bf16 tests in test_bf16.py
take their CUDA path by themselves on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from tldr_rlhf.config import OptimArgs
from tldr_rlhf.train.loop import build_optimizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")]


def test_8bit_adamw_steps_with_8bit_states():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 64).cuda()  # 8192 weights: above bitsandbytes' 4096-element threshold for 8-bit states
    before = layer.weight.detach().clone()
    opt = build_optimizer(layer.parameters(), OptimArgs(lr=1.7e-3, optim_8bit="on"), device_type="cuda")
    assert isinstance(opt, bnb.optim.AdamW8bit)
    layer(torch.randn(4, 128, device="cuda")).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(layer.weight, before)
    state = opt.state[layer.weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    # AdamW's first step moves every weight with a nonzero gradient by about lr (the update is sign-like)
    moved = (layer.weight - before).abs()
    assert moved.max().item() == pytest.approx(1.7e-3, rel=0.1)


def test_fsdp2_with_nccl_on_one_gpu_equals_the_unsharded_run(tiny_model_dir, tmp_path):
    """``--run.fsdp`` without a launcher on one GPU: a 1-process NCCL group, the model sharded over it.
    Losses and final weights equal the unsharded run's (float32; 1 process: nothing is reduced)."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import POSTS

    runs = {}
    for name, extra in (("plain", []), ("fsdp", ["--run.fsdp"])):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "tldr_rlhf.cli", "sft", "--model.path", str(tiny_model_dir), "--model.dtype", "float32", "--data.train", str(POSTS),
               "--data.max-query-length", "64", "--data.limit", "16", "--data.valid-limit", "4", "--data.valid-fraction", "0.01", "--micro-batch-size", "2",
               "--gradient-accumulation-steps", "2", "--run.max-steps", "3", "--run.save-every", "2", "--run.eval-every", "0", "--run.no-progress",
               "--num-sample-posts", "1", "--run.output-dir", str(out), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = out
    losses = {n: [r["loss/sft"] for r in map(json.loads, (o / "metrics.jsonl").read_text().splitlines()) if "loss/sft" in r] for n, o in runs.items()}
    assert len(losses["fsdp"]) == 3 and losses["fsdp"] == pytest.approx(losses["plain"], abs=1e-5)
    assert (runs["fsdp"] / "checkpoints" / "step-2" / "sharded" / ".metadata").exists()
    a, b = load_file(runs["plain"] / "final" / "model.safetensors"), load_file(runs["fsdp"] / "final" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
