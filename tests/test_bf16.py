"""bf16 mixed precision without noise (issue 14 item 4): under bf16 autocast (``--dtype bfloat16``; on
CPU bf16 autocast exists, so the CUDA regime runs here) the frozen reference and reward model compute
in the policy's own precision regime, so before the first update the KL to the reference is exactly 0
and the PPO / GRPO ratio exactly 1, and DPO's cached reference log-probs are the step-0 policy's.

Before the fix the frozen models were held in bf16 weights while the policy kept float32 master
weights: on these tiny models the first update's mean KL was then -7e-4 nats (PPO) and -1e-5 (GRPO)
instead of 0 (SmolLM2-135M: per-token noise of std 0.10 nats). These tests fail that way with the
old frozen dtype restored, and on main also because CPU bfloat16 had no autocast."""

import json
import math

import pytest
import torch

from tldr_rlhf.config import DPOConfig, GRPOConfig, ModelArgs, OptimArgs, PPOConfig, PreferenceDataArgs, RunArgs, TldrDataArgs
from tldr_rlhf.ops import token_logprobs
from tldr_rlhf.rollout import response_logprobs, rollout
from tldr_rlhf.train import dpo, grpo, ppo
from tldr_rlhf.train.common import make_accelerator
from tldr_rlhf.precision import frozen_weights_dtype
from tldr_rlhf.reward.loading import load_frozen_reward_model
from tldr_rlhf.train.rl_common import load_rl_models
from tldr_rlhf.value_model import PolicyAndValue, ValueModel

from conftest import COMPARISONS, QWEN_TOKENIZER
from rl_fixtures import EOS, POSTS, model_reward


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


QUERIES = [[9707, 11, 1879, 0, 576], [785, 3974, 13876], [40, 1075, 311, 1349, 1045, 6, 7]]


def _rollout_bf16(ckpts, tok, dtype_name):
    sft, rm = ckpts
    acc = make_accelerator(ModelArgs(path=sft, dtype=dtype_name), RunArgs(num_threads=1))
    policy, ref = load_rl_models(sft, tok, dtype=frozen_weights_dtype(dtype_name), device=acc.device)
    reward_model = load_frozen_reward_model(rm, dtype=frozen_weights_dtype(dtype_name)).to(acc.device)
    model = PolicyAndValue(policy, ValueModel.from_scalar_model(reward_model).float())
    torch.manual_seed(0)
    with acc.autocast():
        r = rollout(policy, ref, model_reward(reward_model, acc.device, acc.autocast), QUERIES, eos_token_id=EOS, pad_token_id=EOS,
                    response_length=6, temperature=0.7, batch_size=3)
    return acc, model, r


def test_bf16_rollout_reference_and_training_pass_agree_exactly(ckpts, qwen_tokenizer):
    acc, model, r = _rollout_bf16(ckpts, qwen_tokenizer, "bfloat16")
    assert acc.mixed_precision == "bf16"  # CPU too: the CUDA regime, testable here
    # frozen models hold the policy's float32 master weights and run under the same autocast
    assert {p.dtype for p in model.policy.parameters()} == {torch.float32}
    # KL exactly 0 before any update: reference log-probs are the policy's, bit for bit
    assert torch.equal(r.ref_logprobs[r.mask], r.logprobs[r.mask])
    # the training pass (train mode, micro-batch of 2, autocast) reproduces the rollout log-probs: ratio exactly 1
    model.train()
    mb = r.select([2, 0])
    with acc.autocast():
        logits, _ = model(mb.batch.input_ids, mb.batch.attention_mask, mb.batch.query_width)
        new = token_logprobs(logits, mb.batch.responses, 0.7)
    assert torch.equal(torch.exp(new - mb.logprobs)[mb.mask], torch.ones(int(mb.mask.sum())))
    # and this really is bf16 compute: outside autocast (float32) the same tokens score differently
    full32, _ = response_logprobs(model.policy, mb.batch, temperature=0.7)
    assert not torch.equal(full32[mb.mask], mb.logprobs[mb.mask])


def _first_update(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "objective/scores" in l][0]


def test_bf16_ppo_first_update_kl_zero_ratio_one(ckpts, tmp_path):
    cfg = PPOConfig(
        sft_path=ckpts[0], rm_path=ckpts[1], dtype="bfloat16",
        data=TldrDataArgs(train=POSTS, limit=16, max_query_length=64, valid_fraction=0.1),
        optim=OptimArgs(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, max_grad_norm=0.0),
        run=RunArgs(output_dir=str(tmp_path / "ppo"), save_every=0, eval_every=0, progress=False, num_threads=1),
        total_episodes=8, rollout_batch_size=8, num_mini_batches=2, micro_batch_size=2, forward_batch_size=8,
        ppo_epochs=1, response_length=6, num_sample_posts=0,
    )
    ppo.train(cfg)
    u = _first_update(tmp_path / "ppo")
    assert u["objective/kl"] == 0.0 and u["objective/non_score_reward"] == 0.0
    assert u["ppo/first_minibatch_ratio_max_abs_dev"] == 0.0
    assert u["ppo/ratio_max_abs_dev"] > 0.0  # the second minibatch follows an optimizer step


def test_bf16_grpo_first_update_kl_zero_ratio_one(ckpts, tmp_path):
    cfg = GRPOConfig(
        sft_path=ckpts[0], rm_path=ckpts[1], dtype="bfloat16",
        data=TldrDataArgs(train=POSTS, limit=8, max_query_length=64, valid_fraction=0.1),
        optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=0, max_grad_norm=1.0),
        run=RunArgs(output_dir=str(tmp_path / "grpo"), save_every=0, eval_every=0, progress=False, num_threads=1),
        rollout_prompts=2, group_size=4, micro_batch_size=2, forward_batch_size=8, response_length=6, num_sample_posts=0,
        total_episodes=8, mini_batch_size=4, update_per_rollout=1,
    )
    grpo.train(cfg)
    u = _first_update(tmp_path / "grpo")
    assert u["objective/kl"] == 0.0
    assert u["grpo/first_minibatch_ratio_max_abs_dev"] == 0.0


def test_bf16_dpo_cached_reference_is_the_step0_policy(tiny_model_dir, tmp_path):
    cfg = DPOConfig(
        sft_path=str(tiny_model_dir), tokenizer=str(QWEN_TOKENIZER), dtype="bfloat16",
        data=PreferenceDataArgs(comparisons=str(COMPARISONS), max_query_length=96, max_response_length=40, limit=40, valid_limit=6),
        optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=0),
        run=RunArgs(output_dir=str(tmp_path / "dpo"), save_every=0, max_steps=1, progress=False, eval_every=0, num_threads=1),
        micro_batch_size=2, gradient_accumulation_steps=2, eval_batch_size=4, num_sample_posts=0,
    )
    dpo.train(cfg)
    step = [json.loads(l) for l in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines() if "loss/dpo" in l][0]
    # step 1's forward is the SFT policy itself, under bf16 autocast like the cached reference: every
    # implicit reward beta * (log pi - log pi_ref) is exactly 0 and the loss is exactly the float32 log 2
    assert step["rewards/chosen"] == 0.0 and step["rewards/rejected"] == 0.0 and step["rewards/margin"] == 0.0
    assert step["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)


def test_stages_of_different_precision_run_in_one_process():
    # a pipeline runs its stages in one process: an fp32 stage, then a bf16 one, then fp32 again
    # (accelerate alone refuses to change the mixed precision of its process-wide state)
    assert make_accelerator(ModelArgs(dtype="float32"), RunArgs()).mixed_precision == "no"
    acc = make_accelerator(ModelArgs(dtype="bfloat16"), RunArgs())
    assert acc.mixed_precision == "bf16"
    with acc.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert make_accelerator(ModelArgs(dtype="float32"), RunArgs()).mixed_precision == "no"
