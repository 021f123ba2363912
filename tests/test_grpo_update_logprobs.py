"""GRPO with one optimizer step per rollout skips the policy's scoring pass (``group_rl.update_fills_logprobs``):
the update's own forward runs on the weights that sampled the rollout, so it gives the old log-probs (and the
entropy), as TRL's GRPO does with ``num_iterations`` 1. The run must train exactly as with the pass, and
the pass must still run whenever an optimizer step comes before a micro-batch's forward."""

import json
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from tldr_rlhf.config import GRPOConfig, OptimArgs, RunArgs, TldrDataArgs
from tldr_rlhf.train import group_rl, grpo

from rl_fixtures import POSTS

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
GROUP_LOGPROBS = group_rl.group_logprobs


def test_one_step_per_rollout_only():
    # rows = local rollout sequences; every micro-batch's forward must come before the rollout's only optimizer step
    one_pass = SimpleNamespace(update_per_rollout=1)
    assert group_rl.update_fills_logprobs(one_pass, 8, 8)
    assert not group_rl.update_fills_logprobs(one_pass, 4, 8)  # the second minibatch follows an optimizer step
    assert not group_rl.update_fills_logprobs(SimpleNamespace(update_per_rollout=2), 8, 8)  # so does the second pass


def _run(ckpts, out, *, from_update: bool, mini_batch_size: int, monkeypatch):
    """A 2-rollout fp32 GRPO run (2 prompts x 4, micro-batches of 2, lr high enough to move the policy);
    returns (final weights, per-update metrics, the ``with_entropy`` flag of every ``group_logprobs`` call in order:
    True for the policy's pass, False for the reference's)."""
    cfg = GRPOConfig(
        sft_path=ckpts[0], rm_path=ckpts[1], dtype="float32",
        data=TldrDataArgs(train=POSTS, limit=8, max_query_length=64, valid_fraction=0.1),
        optim=OptimArgs(lr=3e-3, min_lr=3e-3, warmup_steps=0, decay_steps=0, max_grad_norm=1.0),
        run=RunArgs(output_dir=str(out), save_every=0, eval_every=0, progress=False, num_threads=1, seed=3),
        rollout_prompts=2, group_size=4, micro_batch_size=2, forward_batch_size=8, response_length=6, num_sample_posts=0,
        total_episodes=16, mini_batch_size=mini_batch_size, update_per_rollout=1, no_eos_penalty=None,  # tiny models never end: scores must differ
    )
    passes = []  # with_entropy of each group_logprobs call: True = the policy's pass, False = the reference's
    monkeypatch.setattr(group_rl, "group_logprobs", lambda model, *a, **k: (passes.append(k.get("with_entropy", False)), GROUP_LOGPROBS(model, *a, **k))[1])
    final = group_rl.train(cfg, "grpo", advantages=grpo.group_relative_advantages, loss=grpo.token_loss, sample=grpo.sample_groups, token_metrics=True, logprobs_from_update=from_update)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "objective/scores" in l]
    return load_file(f"{final}/model.safetensors"), metrics, passes


def test_grpo_trains_identically_without_the_policy_pass(ckpts, tmp_path, monkeypatch):
    want, want_m, want_passes = _run(ckpts, tmp_path / "with-pass", from_update=False, mini_batch_size=8, monkeypatch=monkeypatch)
    got, got_m, got_passes = _run(ckpts, tmp_path / "from-update", from_update=True, mini_batch_size=8, monkeypatch=monkeypatch)
    # with the pass: policy (with entropy) then reference, per rollout; from the update: the reference only
    assert want_passes == [True, False, True, False] and got_passes == [False, False]
    assert max((want[k] - got[k]).abs().max().item() for k in want) < 1e-6
    assert any((want[k] - load_file(f"{ckpts[0]}/model.safetensors")[k]).abs().max() > 1e-4 for k in want)  # the policy moved
    for w, g in zip(want_m, got_m, strict=True):
        for key in ("objective/kl", "objective/entropy", "loss/policy", "grpo/approx_kl", "objective/scores"):
            assert g[key] == pytest.approx(w[key], abs=1e-5), key
        assert g["grpo/ratio_max_abs_dev"] == 0.0
    assert want_m[1]["objective/kl"] != 0.0  # the second rollout's policy is not the reference: the KL is measured


def test_two_minibatches_keep_the_policy_pass(ckpts, tmp_path, monkeypatch):
    # the second minibatch's forward follows an optimizer step: its old log-probs must be the rollout's, not its own
    _, metrics, passes = _run(ckpts, tmp_path / "two", from_update=True, mini_batch_size=4, monkeypatch=monkeypatch)
    assert passes == [True, False, True, False]
    assert all(m["grpo/ratio_max_abs_dev"] > 0.0 for m in metrics)
