"""SFT: loss values, the global-batch token mean, schedule, run folders, exact resume, 2-process sync."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import EOS, POSTS, free_port

from tldr_rlhf.config import ModelArgs, OptimArgs, RunArgs, SFTConfig, TldrDataArgs
from tldr_rlhf.data.batching import collate_query_response
from tldr_rlhf.errors import RunDirError
from tldr_rlhf.losses import sft_loss
from tldr_rlhf.train import loop, sft  # loop.save_checkpoint: where every stage checkpoints
from tldr_rlhf.train.loop import lr_at


def test_sft_loss_hand_values():
    # Real tokens: log-probs log 0.5, log 0.25 (row 0) and log 1 (row 1); the padded slot is ignored.
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)], [0.0, -99.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss, m = sft_loss(logprobs, mask)
    # (0.693147 + 1.386294 + 0) / 3 tokens = 0.693147
    assert loss.item() == pytest.approx(0.693147, abs=1e-6)
    assert m["tokens"].item() == 3
    # Normalised by the global batch's 6 tokens instead: 2.079442 / 6
    assert sft_loss(logprobs, mask, 6)[0].item() == pytest.approx(0.346574, abs=1e-6)


def test_nplus_5_target_logprobs_match_full_forward(tiny_model):
    """Response-only logits (LM head on T positions) equal a plain full forward, and the query
    option covers every non-pad token after the first."""
    batch = collate_query_response([[10, 11, 12], [13]], [[20, 21, EOS], [22, EOS]], EOS)
    lp, mask = sft.target_logprobs(tiny_model, batch, loss_on_query=False)
    # independent computation, row by row without padding
    for b, (q, r) in enumerate([([10, 11, 12], [20, 21, EOS]), ([13], [22, EOS])]):
        ids = torch.tensor([q + r])
        logp = F.log_softmax(tiny_model(ids).logits[0, :-1].float(), -1)
        want = logp[torch.arange(len(q) - 1, len(q) + len(r) - 1), torch.tensor(r)]
        torch.testing.assert_close(lp[b, : len(r)], want, atol=1e-5, rtol=1e-5)
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    lpq, maskq = sft.target_logprobs(tiny_model, batch, loss_on_query=True)
    # row 0: 6 real tokens -> 5 targets; row 1: 3 real tokens -> 2 targets (pads never targets)
    assert maskq.sum(1).tolist() == [5, 2]
    torch.testing.assert_close(lpq[0, -3:], lp[0], atol=1e-5, rtol=1e-5)


def test_cosine_schedule_with_warmup_to_min_lr():
    kw = dict(peak=3e-6, minimum=3e-7, warmup=10, decay=800)
    assert lr_at(0, **kw) == pytest.approx(3e-7)  # 3e-6 * 1/10
    assert lr_at(9, **kw) == pytest.approx(3e-6)
    assert lr_at(10 + 400, **kw) == pytest.approx(3e-7 + 0.5 * 2.7e-6)  # half way: cos(pi/2) = 0
    assert lr_at(10 + 800, **kw) == pytest.approx(3e-7)
    assert lr_at(5000, **kw) == pytest.approx(3e-7)


def _cfg(model_dir, out, **run):
    return SFTConfig(
        model=ModelArgs(path=str(model_dir)),
        data=TldrDataArgs(train=str(POSTS), max_query_length=96, limit=16, valid_limit=4, valid_fraction=0.01),
        optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=1, decay_steps=0),
        run=RunArgs(output_dir=str(out), progress=False, eval_every=0, **{"save_every": 2, **run}),
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        num_sample_posts=1,
    )


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss/sft"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss/sft" in r}


def test_sft_run_learns_saves_and_refuses_to_overwrite(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    final = sft.train(_cfg(tiny_model_dir, out, max_steps=4))
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[4] < losses[1]  # lr 1e-3 on a random tiny model: the loss falls within 4 steps
    trained = AutoModelForCausalLM.from_pretrained(final)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)
    assert (out / "config.json").exists() and (out / "samples.jsonl").exists()
    with pytest.raises(RunDirError, match="already holds a finished run"):
        sft.train(_cfg(tiny_model_dir, out, max_steps=4))


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    sft.train(_cfg(tiny_model_dir, straight, max_steps=4))

    crashed = tmp_path / "crashed"
    real_save = loop.save_checkpoint

    def save_then_crash(run, step, *a, **k):
        real_save(run, step, *a, **k)
        raise KeyboardInterrupt("simulated crash after the step-2 checkpoint")

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        sft.train(_cfg(tiny_model_dir, crashed, max_steps=4))
    assert sorted(_losses(crashed)) == [1, 2]
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    sft.train(_cfg(tiny_model_dir, crashed, max_steps=4))
    a, b = _losses(straight), _losses(crashed)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], abs=1e-6)


def test_two_process_data_parallel_matches_one_process(tiny_model_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo), micro-batch 1 x accumulation 2 each, gives the same
    global batches, losses and weights as 1 process with accumulation 4; ranks stay in sync."""
    script = Path(__file__).with_name("dist_sft_script.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(free_port()), str(script), str(tiny_model_dir), str(POSTS), str(out), str(4 // world)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[world] = out
    l1, l2 = _losses(runs[1]), _losses(runs[2])
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], abs=1e-5)
    last = [json.loads(x) for x in (runs[2] / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["dist/params_in_sync"] is True
    from safetensors.torch import load_file

    w1, w2 = load_file(runs[1] / "final" / "model.safetensors"), load_file(runs[2] / "final" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4)
