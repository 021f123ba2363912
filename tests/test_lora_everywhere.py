"""LoRA in every stage (issue 14 item 3): the reward model, PPO (policy, and the value model's own
adapters), GRPO and RLOO, on top of SFT and DPO. Under LoRA the reference policy is the policy with
its adapters disabled (no second copy); a run saves its final/ merged (an ordinary Hugging Face
checkpoint) and its adapters alone in final/adapter (PEFT format). 4-bit QLoRA is CUDA-only and is
refused elsewhere with one line naming the flag."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tldr_rlhf.config import GRPOConfig, ModelArgs, OptimArgs, PPOConfig, RLOOConfig, RunArgs, SFTConfig, TldrDataArgs
from tldr_rlhf.errors import ConfigError
from tldr_rlhf.modeling import ADAPTER_DIR, AdaptersDisabled, apply_lora, load_causal_lm, quantization_4bit
from tldr_rlhf.reward.loading import init_reward_model, save_reward_model
from tldr_rlhf.rollout import response_logprobs
from tldr_rlhf.data.batching import collate_query_response
from tldr_rlhf.train import grpo, ppo, rloo
from tldr_rlhf.train.rl_common import load_rl_models
from tldr_rlhf.validation import validate_config

from rl_fixtures import EOS, POSTS, crashed_after_first_update, make_tiny_qwen2


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


BATCH = collate_query_response([[9707, 11, 1879], [785, 3974, 13876, 6, 7]], [[40, 1075, 311, EOS], [1349, EOS]], EOS)


def test_reference_under_disabled_adapters_is_the_base_model(ckpts, qwen_tokenizer):
    sft, rm = ckpts
    policy, ref = load_rl_models(sft, qwen_tokenizer, dtype=torch.float32, device=torch.device("cpu"), lora_r=4, lora_alpha=8)
    assert isinstance(ref, AdaptersDisabled) and ref.policy is policy  # no second copy
    base = load_causal_lm(sft, tokenizer=qwen_tokenizer)
    want, _ = response_logprobs(base, BATCH, temperature=0.7)
    with torch.no_grad():
        for n, p in policy.named_parameters():  # trained adapters: B moved off its zero init
            if "lora_B" in n:
                p.normal_(0, 0.5)
    got, _ = response_logprobs(ref, BATCH, temperature=0.7)
    moved, _ = response_logprobs(policy, BATCH, temperature=0.7)
    m = BATCH.response_mask
    assert torch.equal(got[m], want[m])
    assert (moved[m] - want[m]).abs().max() > 1e-3
    policy.train()
    ref.eval()
    assert policy.training  # the reference view leaves the policy's mode alone


def _updates(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "objective/scores" in l]


def _only_lora_moved(sft_dir, final):
    """The merged final/ differs from the SFT weights exactly in the adapted linear layers; its
    adapter folder on the SFT base gives the merged model's log-probs."""
    before, after = load_file(f"{sft_dir}/model.safetensors"), load_file(f"{final}/model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed), sorted(changed)[:5]
    assert "model.embed_tokens.weight" not in changed and not any("norm" in k for k in changed)
    cfg = json.loads((final / ADAPTER_DIR / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    merged = AutoModelForCausalLM.from_pretrained(final)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_dir), final / ADAPTER_DIR)
    a, _ = response_logprobs(merged, BATCH, temperature=1.0)
    b, _ = response_logprobs(adapted, BATCH, temperature=1.0)
    assert torch.allclose(a[BATCH.response_mask], b[BATCH.response_mask], atol=1e-5)


def _group_common(sft, rm, out):
    return dict(
        sft_path=sft, rm_path=rm, dtype="float32", lora_r=4, lora_alpha=8,
        data=TldrDataArgs(train=POSTS, limit=8, max_query_length=64, valid_fraction=0.1),
        optim=OptimArgs(lr=1e-2, min_lr=1e-3, warmup_steps=0, decay_steps=0, max_grad_norm=1.0),
        run=RunArgs(output_dir=str(out), save_every=0, eval_every=0, progress=False, num_threads=1),
        rollout_prompts=2, group_size=4, micro_batch_size=2, forward_batch_size=8, response_length=6, num_sample_posts=0,
        total_episodes=8, mini_batch_size=4, update_per_rollout=2,
    )


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_group_rl_with_lora(ckpts, tmp_path, stage):
    # a random tiny policy never samples EOS in 6 tokens: every response would get the same no-EOS
    # score and every group advantage would be 0; without the EOS trick the reward model scores them
    out = tmp_path / stage
    common = {**_group_common(*ckpts, out), "no_eos_penalty": None}
    if stage == "grpo":
        final = grpo.train(GRPOConfig(**common))
    else:
        final = rloo.train(RLOOConfig(**{**common, "kl_coef": 0.05}))
    u = _updates(out)[0]
    assert u["objective/kl"] == 0.0  # adapters start at B = 0: the policy is exactly the reference
    assert u[f"{stage}/first_minibatch_ratio_max_abs_dev"] == 0.0 and u[f"{stage}/ratio_max_abs_dev"] > 0.0
    _only_lora_moved(ckpts[0], out / "final")
    assert str(final) == str(out / "final")


def test_ppo_with_lora_policy_and_value_adapters(ckpts, tmp_path, monkeypatch):
    from tldr_rlhf.train import rl_common

    seen = {}
    real = rl_common.start_updates

    def spy(rl, model, *a, **k):
        seen["trainable"] = sorted({n.split(".")[0] + ("/lora" if "lora_" in n else "/head" if n.startswith("value.head") else "/other") for n, p in model.named_parameters() if p.requires_grad})
        return real(rl, model, *a, **k)

    monkeypatch.setattr("tldr_rlhf.train.ppo.start_updates", spy)
    cfg = PPOConfig(
        sft_path=ckpts[0], rm_path=ckpts[1], dtype="float32", lora_r=4, lora_alpha=8,
        data=TldrDataArgs(train=POSTS, limit=16, max_query_length=64, valid_fraction=0.1),
        optim=OptimArgs(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, max_grad_norm=0.0),
        run=RunArgs(output_dir=str(tmp_path / "ppo"), save_every=0, eval_every=0, progress=False, num_threads=1),
        total_episodes=8, rollout_batch_size=8, num_mini_batches=2, micro_batch_size=4, forward_batch_size=8,
        ppo_epochs=1, response_length=6, num_sample_posts=0,
    )
    ppo.train(cfg)
    # trained: the policy's and the value model's adapters, and the value head in full; nothing else
    assert seen["trainable"] == ["policy/lora", "value/head", "value/lora"]
    u = _updates(tmp_path / "ppo")[0]
    assert u["objective/kl"] == 0.0 and u["ppo/first_minibatch_ratio_max_abs_dev"] == 0.0
    _only_lora_moved(ckpts[0], tmp_path / "ppo" / "final")


def test_reward_model_with_lora_trains_adapters_and_head_and_saves_both(ckpts, qwen_tokenizer, tmp_path):
    sft, _ = ckpts
    model = init_reward_model(ModelArgs(path=sft, dtype="float32", lora_r=4, lora_alpha=8), qwen_tokenizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".score.modules_to_save." in n for n in trainable), sorted(trainable)
    assert any(".score.modules_to_save." in n for n in trainable)  # the head is trained in full
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
        model.score.bias.fill_(0.25)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=BATCH.input_ids, attention_mask=BATCH.attention_mask).rewards
    save_reward_model(model, qwen_tokenizer, tmp_path / "rm")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        got = merged(input_ids=BATCH.input_ids, attention_mask=BATCH.attention_mask).rewards
    assert torch.allclose(got, want, atol=1e-5) and merged.score.bias.item() == 0.25
    assert (tmp_path / "rm" / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert any("score" in k for k in load_file(tmp_path / "rm" / ADAPTER_DIR / "adapter_model.safetensors"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_qlora_refused_without_cuda_with_one_line_naming_the_flag(ckpts):
    sft, rm = ckpts
    with pytest.raises(ConfigError, match=r"^--load-in-4bit: 4-bit \(QLoRA\) base weights need a CUDA GPU"):
        validate_config(PPOConfig(sft_path=sft, rm_path=rm, lora_r=4, load_in_4bit=True, total_episodes=512))
    with pytest.raises(ConfigError, match=r"^--model.load-in-4bit: 4-bit \(QLoRA\) base weights need a CUDA GPU"):
        validate_config(SFTConfig(model=ModelArgs(path=sft, lora_r=8, load_in_4bit=True)), check_paths=False)
    with pytest.raises(ConfigError, match=r"^--load-in-4bit: 4-bit base weights are frozen, so it needs LoRA adapters to train \(--lora-r > 0\)"):
        validate_config(GRPOConfig(sft_path=sft, rm_path=rm, load_in_4bit=True), check_paths=False)
    with pytest.raises(ConfigError, match="need a CUDA GPU"):
        quantization_4bit()  # library use, past the validation
    validate_config(PPOConfig(sft_path=sft, rm_path=rm, lora_r=4, total_episodes=512))  # LoRA alone is fine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_qlora_policy_loads_in_4bit_and_trains_adapters(ckpts, qwen_tokenizer):
    sft, rm = ckpts
    policy, ref = load_rl_models(sft, qwen_tokenizer, dtype=torch.float32, device=torch.device("cuda"), lora_r=4, load_in_4bit=True)
    assert policy.get_base_model().is_loaded_in_4bit and isinstance(ref, AdaptersDisabled)
    assert all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)


def test_ppo_with_lora_resumes_exactly(ckpts, tmp_path):
    import shutil

    def cfg(out):
        return PPOConfig(
            sft_path=ckpts[0], rm_path=ckpts[1], dtype="float32", lora_r=4, lora_alpha=8,
            data=TldrDataArgs(train=POSTS, limit=16, max_query_length=64, valid_fraction=0.1),
            optim=OptimArgs(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, max_grad_norm=0.0),
            run=RunArgs(output_dir=str(out), save_every=1, eval_every=0, progress=False, num_threads=1),
            total_episodes=16, rollout_batch_size=8, num_mini_batches=2, micro_batch_size=4, forward_batch_size=8,
            ppo_epochs=1, response_length=6, num_sample_posts=0,
        )

    final = ppo.train(cfg(tmp_path / "run"))
    crashed = crashed_after_first_update(tmp_path / "run", tmp_path / "crashed")  # only checkpoints/step-1 survives
    assert (crashed / "checkpoints" / "step-1" / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    resumed = ppo.train(cfg(crashed))
    a, b = load_file(f"{final}/model.safetensors"), load_file(f"{resumed}/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # policy adapters restored
    want = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "loss/value" in l]
    got = [json.loads(l) for l in (crashed / "metrics.jsonl").read_text().splitlines() if "loss/value" in l]
    assert [r["loss/value"] for r in got] == [r["loss/value"] for r in want]  # value adapters and head restored


def test_rm_training_run_with_lora_normalizes_and_saves_merged(ckpts, qwen_tokenizer, tmp_path):
    from conftest import COMPARISONS, POSTS as SFT_POSTS
    from tldr_rlhf.config import PreferenceDataArgs, RMConfig, RewardNormArgs
    from tldr_rlhf.train import rm

    sft, _ = ckpts
    cfg = RMConfig(
        model=ModelArgs(path=sft, dtype="float32", lora_r=4, lora_alpha=8),
        data=PreferenceDataArgs(comparisons=str(COMPARISONS), max_query_length=64, limit=16, valid_limit=8),
        norm=RewardNormArgs(posts=str(SFT_POSTS), limit=8),
        optim=OptimArgs(lr=1e-2, min_lr=1e-3, warmup_steps=0, decay_steps=0),
        run=RunArgs(output_dir=str(tmp_path / "rm"), progress=False, eval_every=0, save_every=0, max_steps=2, num_threads=1),
        micro_batch_size=4, gradient_accumulation_steps=2, eval_batch_size=8,
    )
    final = rm.train(cfg)
    last = [json.loads(l) for l in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()][-1]
    assert abs(last["norm/mean_after"]) < 1e-4  # the bias shift reached the trained head copy
    merged = AutoModelForSequenceClassification.from_pretrained(final)
    assert merged.config.reward_offset != 0.0
    assert (tmp_path / "rm" / "final" / ADAPTER_DIR / "adapter_config.json").is_file()
    with pytest.raises(ConfigError, match="--train-layers"):
        validate_config(RMConfig(model=ModelArgs(path=sft, lora_r=4), train_layers=1), check_paths=False)


def test_a_lora_model_gets_the_cache_keyword_of_the_model_it_wraps():
    """PEFT's forward takes **kwargs and passes them through: the wrapped model's signature decides the
    key/value-cache keyword (``cache`` on transformers >= 5.24, where ``past_key_values`` is deprecated).
    Reading the wrapper's own signature gave the deprecated name to every shared-prompt pass under LoRA."""
    from tldr_rlhf.modeling import kv_cache_kwargs

    base = make_tiny_qwen2()
    want = kv_cache_kwargs(base, None)
    assert list(kv_cache_kwargs(apply_lora(make_tiny_qwen2(), r=2, alpha=4), None)) == list(want)
