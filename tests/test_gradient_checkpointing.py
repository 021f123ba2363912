"""Activation checkpointing (issue 14 item 2): the flag of every stage turns it on for the models that
stage trains, and it changes no number: losses and gradients are bit-for-bit those without it
(tolerance 0: recomputation repeats the same CPU kernels on the same inputs, and dropout is off).
Under checkpointing transformers drops key/value caches in training forwards, so the shared-prompt
paths (``lm_head._response_hidden``, ``ScalarRewardModel._shared_prompt_hidden``) run full rows there;
these tests fail if they kept sharing (the responses would not see their query). The memory saving
is measured in benchmarks/bench_gradient_checkpointing.py, not here."""

import copy
import json

import pytest
import torch

from tldr_rlhf.config import ModelArgs, OptimArgs, PPOConfig, RunArgs, TldrDataArgs
from tldr_rlhf.data.batching import collate_preferences
from tldr_rlhf.data.comparisons import PreferenceExample
from tldr_rlhf.lm_head import response_token_logprobs
from tldr_rlhf.modeling import apply_lora, checkpointing_active, checkpointing_enabled, enable_gradient_checkpointing
from tldr_rlhf.reward.loading import init_reward_model
from tldr_rlhf.reward.reward_model import RewardModelConfig, ScalarRewardModel
from tldr_rlhf.train import ppo
from tldr_rlhf.train.common import load_policy
from tldr_rlhf.value_model import ValueModel

from conftest import make_tiny_qwen2
from rl_fixtures import POSTS, make_checkpoints, tiny_config


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


EXAMPLES = [
    PreferenceExample("a", [5, 6, 7, 8, 9], [10, 11, 12], [20, 21]),
    PreferenceExample("b", [1, 2, 3], [13], [22, 23, 24, 25, 26]),
    PreferenceExample("c", [4, 4, 4, 4, 4, 4, 4], [14, 15, 16, 17], [27]),
]


def _pairs():
    return collate_preferences(EXAMPLES, 0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _policy_loss_and_grads(model, shared: bool):
    model.train()
    model.zero_grad()
    b = _pairs()
    lp = response_token_logprobs(model, b, num_queries=len(EXAMPLES) if shared else None, temperature=0.7)  # (2B, T)
    loss = -(lp * torch.arange(1, lp.shape[1] + 1)).sum()  # a weighted sum: every position's gradient counts
    loss.backward()
    return lp.detach(), _grads(model)


@pytest.mark.parametrize("lora", [False, True])
def test_policy_logprobs_and_gradients_identical_with_checkpointing(lora):
    base = make_tiny_qwen2(seed=3)
    if lora:
        base = apply_lora(base, r=4, alpha=8)
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.1)
    ckpt = enable_gradient_checkpointing(copy.deepcopy(base))
    full_lp, full_g = _policy_loss_and_grads(base, shared=False)
    shared_lp, _ = _policy_loss_and_grads(base, shared=True)
    ck_lp, ck_g = _policy_loss_and_grads(ckpt, shared=True)  # asks for the shared prompt: runs full rows
    backbone = ckpt.get_base_model().model if lora else ckpt.model
    assert checkpointing_active(backbone)  # train mode, gradients on
    with torch.no_grad():
        assert not checkpointing_active(backbone)
    assert torch.equal(ck_lp, full_lp)
    assert full_g.keys() == ck_g.keys() and len(full_g) > 0
    for n in full_g:
        assert torch.equal(ck_g[n], full_g[n]), n
    assert torch.allclose(shared_lp, full_lp, atol=1e-5)  # sharing itself only rounds differently
    # without gradients (reference log-probs, rollouts) the shared prompt still runs on its cache
    with torch.no_grad():
        again = response_token_logprobs(ckpt, _pairs(), num_queries=len(EXAMPLES), temperature=0.7)
    assert torch.equal(again, shared_lp)


def _rm_loss_and_grads(model):
    model.train()
    model.zero_grad()
    b = _pairs()
    r = model(input_ids=b.input_ids, attention_mask=b.attention_mask, num_queries=len(EXAMPLES), query_width=b.query_width).rewards
    loss = -torch.nn.functional.logsigmoid(r[:3] - r[3:]).mean()  # pairwise RM loss
    loss.backward()
    return loss.detach(), _grads(model)


def test_reward_model_loss_and_gradients_identical_with_checkpointing():
    torch.manual_seed(1)
    rm = ScalarRewardModel(RewardModelConfig(text_config=tiny_config()))
    ckpt = enable_gradient_checkpointing(copy.deepcopy(rm))
    assert checkpointing_enabled(ckpt) and not checkpointing_enabled(rm)
    loss, g = _rm_loss_and_grads(rm)
    ck_loss, ck_g = _rm_loss_and_grads(ckpt)
    # rm shares the prompt (rounding 1e-6 apart from full rows), the checkpointed one runs full rows
    assert ck_loss.item() == pytest.approx(loss.item(), abs=1e-6)
    rm.zero_grad()
    b = _pairs()
    r = rm(input_ids=b.input_ids, attention_mask=b.attention_mask).rewards
    full = -torch.nn.functional.logsigmoid(r[:3] - r[3:]).mean()
    full.backward()
    assert torch.equal(ck_loss, full.detach())
    for n, v in _grads(rm).items():
        assert torch.equal(ck_g[n], v), n


def test_value_model_gradients_identical_with_checkpointing():
    torch.manual_seed(2)
    vm = ValueModel.from_scalar_model(ScalarRewardModel(RewardModelConfig(text_config=tiny_config())))
    ckpt = enable_gradient_checkpointing(copy.deepcopy(vm))
    b = _pairs()
    out = []
    for m in (vm, ckpt):
        m.train()
        v = m(b.input_ids, b.attention_mask, b.query_width)
        (v * b.response_mask).square().sum().backward()
        out.append((v.detach(), _grads(m)))
    assert torch.equal(out[0][0], out[1][0])
    for n in out[0][1]:
        assert torch.equal(out[0][1][n], out[1][1][n]), n


def test_flag_reaches_every_stage_model(tiny_model_dir, qwen_tokenizer):
    with pytest.raises(ValueError, match="supports gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
    args = ModelArgs(path=str(tiny_model_dir), dtype="float32", gradient_checkpointing=True)
    assert checkpointing_enabled(load_policy(args, qwen_tokenizer))  # SFT and DPO
    assert not checkpointing_enabled(load_policy(ModelArgs(path=str(tiny_model_dir), dtype="float32"), qwen_tokenizer))
    assert checkpointing_enabled(init_reward_model(args, qwen_tokenizer))  # RM
    from tldr_rlhf.config import DPOConfig, GRPOConfig, RLOOConfig

    assert DPOConfig(sft_path="x", gradient_checkpointing=True).model_args.gradient_checkpointing
    assert GRPOConfig().gradient_checkpointing is False and RLOOConfig(gradient_checkpointing=True).gradient_checkpointing


def test_ppo_run_identical_with_checkpointing(qwen_tokenizer, tmp_path, monkeypatch):
    from tldr_rlhf.train import rl_common

    sft, rm = make_checkpoints(qwen_tokenizer)
    enabled = []  # what the flag turned checkpointing on for: the policy (rl_common) and the value model (ppo)
    for mod in (rl_common, ppo):
        monkeypatch.setattr(mod, "enable_gradient_checkpointing", lambda m, _real=enable_gradient_checkpointing: enabled.append(type(m).__name__) or _real(m))

    def run(name, gc):
        cfg = PPOConfig(
            sft_path=sft, rm_path=rm, dtype="float32", gradient_checkpointing=gc,
            data=TldrDataArgs(train=POSTS, limit=16, max_query_length=64, valid_fraction=0.1),
            optim=OptimArgs(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, max_grad_norm=0.0),
            run=RunArgs(output_dir=str(tmp_path / name), save_every=0, eval_every=0, progress=False, num_threads=1),
            total_episodes=8, rollout_batch_size=8, num_mini_batches=2, micro_batch_size=4, forward_batch_size=8,
            ppo_epochs=2, response_length=6, num_sample_posts=0,
        )
        ppo.train(cfg)
        rec = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if "objective/scores" in l][0]
        return {k: v for k, v in rec.items() if not k.startswith("perf/")}

    plain = run("plain", False)
    assert enabled == []
    ckpt = run("ckpt", True)
    assert enabled == ["Qwen2ForCausalLM", "ValueModel"]
    assert plain["ppo/ratio_max_abs_dev"] > 0  # the policy moved between minibatches
    for k in ("loss/policy", "loss/value", "loss/total", "objective/kl", "objective/scores", "ppo/approx_kl", "ppo/ratio_max_abs_dev", "val/mean"):
        assert ckpt[k] == plain[k], k


def test_dpo_run_with_checkpointing_matches_within_shared_prompt_rounding(tiny_model_dir, tmp_path):
    # DPO's default shared prompt runs full rows in checkpointed training passes (transformers drops
    # the cache there), so the two runs agree up to the shared-vs-full-rows rounding, not bit for bit
    from tldr_rlhf.config import DPOConfig, PreferenceDataArgs
    from tldr_rlhf.train import dpo

    from conftest import COMPARISONS, QWEN_TOKENIZER

    def run(name, gc):
        cfg = DPOConfig(
            sft_path=str(tiny_model_dir), tokenizer=str(QWEN_TOKENIZER), dtype="float32", gradient_checkpointing=gc,
            data=PreferenceDataArgs(comparisons=str(COMPARISONS), max_query_length=96, max_response_length=40, limit=24, valid_limit=4),
            optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=0),
            run=RunArgs(output_dir=str(tmp_path / name), save_every=0, max_steps=2, progress=False, eval_every=0, num_threads=1),
            micro_batch_size=2, gradient_accumulation_steps=2, eval_batch_size=4, num_sample_posts=0,
        )
        dpo.train(cfg)
        return [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if "loss/dpo" in l]

    plain, ckpt = run("plain", False), run("ckpt", True)
    assert len(plain) == len(ckpt) == 2
    assert plain[1]["loss/dpo"] != pytest.approx(plain[0]["loss/dpo"], abs=1e-4)  # the first step moved the policy
    for a, b in zip(plain, ckpt):
        for k in ("loss/dpo", "rewards/margin", "logps/chosen", "logps/rejected"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), k


def test_group_training_pass_takes_full_rows_under_checkpointing():
    """GRPO / RLOO's training forward (``lm_head.grouped_response_logits``, each query once per group)
    must not share the prompt under checkpointing, where transformers drops the cache: the logits and
    gradients equal the full rows exactly. Sharing there would give responses that never saw their query."""
    from tldr_rlhf.data.batching import collate_query_response
    from tldr_rlhf.lm_head import grouped_response_logits
    from tldr_rlhf.modeling import response_logits

    queries = [[5, 6, 7, 8, 9]] * 2 + [[1, 2, 3]] * 2  # two groups of G = 2
    batch = collate_query_response(queries, [[10, 11, 12], [20, 21], [13], [22, 23, 24]], 0)
    model = make_tiny_qwen2()
    enable_gradient_checkpointing(model)
    model.train()

    def run(fn):
        model.zero_grad()
        logits = fn()
        (logits.float().log_softmax(-1)[..., 7] * torch.arange(1, logits.shape[1] + 1)[:, None].T).sum().backward()
        return logits.detach(), _grads(model)

    shared, g_shared = run(lambda: grouped_response_logits(model, batch, shared_prompt=True))
    full, g_full = run(lambda: response_logits(model, batch.input_ids, batch.attention_mask, batch.query_width))
    assert torch.equal(shared, full)
    assert g_shared.keys() == g_full.keys() and all(torch.equal(g_shared[k], g_full[k]) for k in g_full)
