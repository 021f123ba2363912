"""CUDA-only checks (scripts/gpu_check.sh runs them with ``-m gpu``; the CPU suite deselects them):
8-bit AdamW from bitsandbytes. QLoRA is in test_lora_everywhere.py; the bf16 tests in test_bf16.py
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
