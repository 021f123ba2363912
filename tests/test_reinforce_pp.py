"""REINFORCE++ (train/reinforce_pp.py): the estimator and the loss worked out by hand, and a short real run
on the tiny checkpoints that resumes exactly."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tldr_rlhf.config import OptimArgs, RunArgs, TldrDataArgs
from tldr_rlhf.config.rl import ReinforcePPConfig
from tldr_rlhf.errors import RunDirError
from tldr_rlhf.stages import COMMANDS
from tldr_rlhf.train import reinforce_pp

from rl_fixtures import POSTS, crashed_after_first_update

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[0.1, -0.2, 1.7, 0.3]])
    mask = torch.tensor([[True, True, True, False]])
    # gamma 0.5: G2 = 1.7, G1 = -0.2 + 0.5 * 1.7 = 0.65, G0 = 0.1 + 0.5 * 0.65 = 0.425; padding -> 0
    got = reinforce_pp.discounted_returns(rewards, mask, gamma=0.5)
    assert torch.allclose(got, torch.tensor([[0.425, 0.65, 1.7, 0.0]]), atol=1e-6)


def test_advantages_on_a_2x4_batch_by_hand():
    # per-token rewards of two responses, the first one token shorter (its 4th position is padding)
    rewards = torch.tensor([[0.1, -0.2, 1.7, 0.0], [0.3, 0.3, -0.1, 0.9]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    # gamma 1: returns [1.6, 1.5, 1.7, -] and [1.4, 1.1, 0.8, 0.9]; over the 7 real tokens mean 9 / 7,
    # unbiased variance (12.32 - 81 / 7) / 6 = 0.1247619...; advantage = (G - mean) / sqrt(var + 1e-8)
    mean, var = 9 / 7, (12.32 - 81 / 7) / 6
    expected = [[(g - mean) / math.sqrt(var + 1e-8) for g in row] for row in ([1.6, 1.5, 1.7], [1.4, 1.1, 0.8, 0.9])]
    adv = reinforce_pp.reinforce_pp_advantages(rewards, mask, gamma=1.0)
    assert adv.shape == (2, 4)  # per token, (B, T)
    assert torch.allclose(adv[0, :3], torch.tensor(expected[0]), atol=1e-5)
    assert torch.allclose(adv[1], torch.tensor(expected[1]), atol=1e-5)
    assert adv[0, 3] == 0.0
    assert abs(adv[0, 0].item() - 0.889782) < 1e-5 and abs(adv[1, 2].item() - (-1.375118)) < 1e-5


def test_token_advantages_put_the_kl_penalty_in_every_token_and_the_score_at_the_eos():
    # one response of 3 tokens, score 1.7, per-token k1 KL [0.1, 0.3, -0.2], kl_coef 0.5, gamma 1:
    # rewards [-0.05, -0.15, 0.1 + 1.7], returns [1.6, 1.65, 1.8]
    r = SimpleNamespace(
        scores=torch.tensor([1.7]), logprobs=torch.tensor([[-1.0, -2.0, -0.5]]), ref_logprobs=torch.tensor([[-1.1, -2.3, -0.3]]),
        mask=torch.tensor([[True, True, True]]),
    )
    cfg = SimpleNamespace(kl_coef=0.5, kl_estimator="k1", gamma=1.0)
    adv, metrics = reinforce_pp.token_advantages(r, cfg)
    returns = torch.tensor([1.6, 1.65, 1.8])
    assert torch.allclose(adv[0], (returns - returns.mean()) / torch.sqrt(returns.var() + 1e-8), atol=1e-5)
    assert metrics["objective/rlhf_reward"] == pytest.approx(1.7 - 0.5 * (0.1 + 0.3 - 0.2), abs=1e-6)


def test_clipped_loss_by_hand():
    # ratios 1.5 and 0.5 with advantages 1.7 and -0.3, clip 0.2:
    # token 0: -min(1.5 * 1.7, 1.2 * 1.7) = -2.04; token 1: -min(0.5 * -0.3, 0.8 * -0.3) = 0.24; token mean -0.9
    old = torch.tensor([[-1.0, -2.0]])
    new = old + torch.log(torch.tensor([[1.5, 0.5]]))
    mb = SimpleNamespace(logprobs=old, sample_logprobs=None, mask=torch.tensor([[True, True]]))
    cfg = SimpleNamespace(clip_range=0.2, tis_cap=2.0, tis_level="token")
    loss, m = reinforce_pp.clipped_loss(new, mb, torch.tensor([[1.7, -0.3]]), cfg, num_tokens=2, num_sequences=1)
    assert loss.item() == pytest.approx(-0.9, abs=1e-6)
    assert m["clipfrac"].item() == pytest.approx(1.0)


def test_clipped_loss_weights_a_vllm_rollout_by_its_truncated_importance_weights():
    # same ratios and advantages as above; the sampler (vLLM) gave log-probs -1.5 and -3.0, so the
    # token weights are min(exp(-1 + 1.5), 2) = exp(0.5) = 1.6487 and min(exp(-2 + 3), 2) = 2 (capped):
    # (-2.04 * 1.6487 + 0.24 * 2) / 2 = -1.441696
    old = torch.tensor([[-1.0, -2.0]])
    new = old + torch.log(torch.tensor([[1.5, 0.5]]))
    mb = SimpleNamespace(logprobs=old, sample_logprobs=torch.tensor([[-1.5, -3.0]]), mask=torch.tensor([[True, True]]))
    cfg = SimpleNamespace(clip_range=0.2, tis_cap=2.0, tis_level="token")
    loss, _ = reinforce_pp.clipped_loss(new, mb, torch.tensor([[1.7, -0.3]]), cfg, num_tokens=2, num_sequences=1)
    assert loss.item() == pytest.approx(-1.441696, abs=1e-5)
    off, _ = reinforce_pp.clipped_loss(new, mb, torch.tensor([[1.7, -0.3]]), SimpleNamespace(clip_range=0.2, tis_cap=0.0, tis_level="token"), num_tokens=2, num_sequences=1)
    assert off.item() == pytest.approx(-0.9, abs=1e-6)  # --tis-cap 0: no correction


def test_the_row_makes_it_a_command_a_card_a_curve_and_a_plan():
    row = COMMANDS["reinforce-pp"]
    assert row.family == "rl" and row.train and row.policy and row.pipeline and row.optional
    assert row.config_class() is ReinforcePPConfig and row.function() is reinforce_pp.train
    assert set(row.preset_table()) >= {"default", "cpu-smol"} and row.plan_kind == "group"


def _cfg(sft, rm, out):
    return ReinforcePPConfig(
        sft_path=sft, rm_path=rm, dtype="float32",
        data=TldrDataArgs(train=POSTS, limit=8, max_query_length=64, valid_fraction=0.1),
        optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=0, max_grad_norm=1.0),
        run=RunArgs(output_dir=str(out), save_every=1, eval_every=0, progress=False, num_threads=1),
        rollout_prompts=2, group_size=2, micro_batch_size=2, mini_batch_size=4, forward_batch_size=8, response_length=6,
        num_sample_posts=0, total_episodes=8, update_per_rollout=1,
    )


def test_reinforce_pp_run_changes_the_policy_and_resumes_exactly(ckpts, tmp_path):
    out = tmp_path / "run"
    final = reinforce_pp.train(_cfg(*ckpts, out))
    ups = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "objective/scores" in l]
    assert [u["step"] for u in ups] == [1, 2]
    assert ups[0]["reinforce-pp/first_minibatch_ratio_max_abs_dev"] == 0.0 and "objective/rlhf_reward" in ups[0]
    before, after = load_file(f"{ckpts[0]}/model.safetensors"), load_file(f"{final}/model.safetensors")
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
    # a crash after update 1: only checkpoints/step-1 left; the resumed run ends with the same weights
    crashed = crashed_after_first_update(out, tmp_path / "crashed")
    resumed = reinforce_pp.train(_cfg(*ckpts, crashed))
    a, b = load_file(f"{final}/model.safetensors"), load_file(f"{resumed}/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RunDirError):
        reinforce_pp.train(_cfg(*ckpts, crashed))
