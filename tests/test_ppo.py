"""The PPO stage end to end on tiny models built from a config (real tokenizer, real posts)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tldr_rlhf.config import OptimArgs, PPOConfig, RunArgs, TldrDataArgs
from tldr_rlhf.presets import PPO_PRESETS
from tldr_rlhf.errors import DataError, RunDirError
from tldr_rlhf.train import ppo

from rl_fixtures import POSTS, crashed_after_first_update


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def small_cfg(sft, rm, out, **kw) -> PPOConfig:
    base = dict(
        sft_path=sft, rm_path=rm, dtype="float32",
        data=TldrDataArgs(train=POSTS, limit=16, max_query_length=64, valid_fraction=0.1),
        optim=OptimArgs(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, max_grad_norm=0.0),
        run=RunArgs(output_dir=str(out), save_every=1, eval_every=1, progress=False, num_threads=1),
        total_episodes=16, rollout_batch_size=8, num_mini_batches=2, micro_batch_size=4, forward_batch_size=8,
        ppo_epochs=2, response_length=6, num_sample_posts=2,
    )
    base.update(kw)
    return PPOConfig(**base)


@pytest.fixture(scope="module")
def first_run(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-run") / "run"
    final = ppo.train(small_cfg(*ckpts, out))
    return out, final


def test_ppo_run_folder_metrics_and_samples(first_run):
    out, final = first_run
    assert (out / "config.json").exists() and (out / "final" / "model.safetensors").exists()
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if "objective/scores" in r]
    assert [r["step"] for r in updates] == [1, 2]
    for key in ("objective/scores", "objective/non_score_reward", "objective/kl", "objective/entropy", "objective/response_length",
                "objective/eos_rate", "ppo/clipfrac", "ppo/approx_kl", "ppo/vf_clipfrac", "loss/value", "val/explained_variance"):
        assert key in updates[0], key
    # linear anneal: update 1 at the full lr, update 2 at lr * (1 - 1/2)
    assert updates[0]["lr"] == pytest.approx(1e-3) and updates[1]["lr"] == pytest.approx(5e-4)
    assert isinstance(records[-1]["health/collapse_signals"], list)  # N+ detail 23: checked at the end of every run
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and all({"query", "response", "score", "has_eos"} <= set(s) for s in samples)


def test_nplus_16_ratio_exactly_one_on_first_minibatch_of_first_epoch(first_run):
    out, _ = first_run
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["ppo/first_minibatch_ratio_max_abs_dev"] == 0.0
    # ...while later minibatches of the same update, after optimizer steps, moved the policy
    assert first["ppo/ratio_max_abs_dev"] > 0.0


def test_ppo_changes_policy_weights(first_run, ckpts):
    _, final = first_run
    before = load_file(f"{ckpts[0]}/model.safetensors")
    after = load_file(f"{final}/model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2


def test_ppo_resume_reproduces_the_uninterrupted_run(first_run, ckpts, tmp_path):
    out, final = first_run
    # simulate a crash after update 1: keep only checkpoints/step-1 in a copy of the run folder
    crashed = crashed_after_first_update(out, tmp_path / "run")
    assert (crashed / "checkpoints" / "step-1" / "state.pt").exists()
    resumed = ppo.train(small_cfg(*ckpts, crashed))
    a, b = load_file(f"{final}/model.safetensors"), load_file(f"{resumed}/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    with pytest.raises(RunDirError):
        ppo.train(small_cfg(*ckpts, crashed))  # finished run, no --run.overwrite


def test_ppo_bad_sizes_and_missing_paths_fail_before_models_load(tmp_path):
    with pytest.raises(DataError, match="--sft-path"):
        ppo.train(PPOConfig(run=RunArgs(output_dir=str(tmp_path / "x"))))
    with pytest.raises(ValueError, match="micro_batch_size"):
        PPOConfig(rollout_batch_size=8, num_mini_batches=2, micro_batch_size=3).gradient_accumulation_steps()
    assert PPO_PRESETS["nplus"].num_updates() == 1953 and PPO_PRESETS["nplus"].kl_coef == 0.05


def test_cli_ppo_command_takes_sft_and_rm_paths():
    from tldr_rlhf.cli import parse

    fn, cfg = parse(["ppo", "--preset", "cpu-smol", "--sft-path", "runs/sft/final", "--rm-path", "runs/rm/final", "--run.num-threads", "1"])
    assert (cfg.sft_path, cfg.rm_path, cfg.run.num_threads, cfg.rollout_batch_size) == ("runs/sft/final", "runs/rm/final", 1, 8)
    _, cfg = parse(["ppo", "--sft-path", "a", "--rm-path", "b"])  # first preset (nplus) is the default
    assert cfg.optim.lr == 3e-6 and cfg.optim.max_grad_norm == 0.0 and cfg.response_length == 53


def test_nplus_07_dropout_off_in_policy_reference_value_and_reward_models(tmp_path, qwen_tokenizer):
    # checkpoints saved WITH dropout: every model PPO builds from them must come out with it off
    from tldr_rlhf.modeling import load_causal_lm
    from tldr_rlhf.reward.reward_model import RewardModelConfig, ScalarRewardModel
    from tldr_rlhf.modeling import freeze, load_frozen_reference as load_reference
    from tldr_rlhf.reward.loading import load_frozen_reward_model as load_reward_model
    from tldr_rlhf.value_model import ValueModel

    from rl_fixtures import STAGE_HIDDEN, make_tiny_qwen2, tiny_config

    lm = make_tiny_qwen2(hidden=STAGE_HIDDEN)
    lm.config.attention_dropout = 0.1
    lm.save_pretrained(tmp_path / "sft")
    cfg = tiny_config(hidden=STAGE_HIDDEN)
    cfg.attention_dropout = 0.1
    ScalarRewardModel(RewardModelConfig(text_config=cfg)).save_pretrained(tmp_path / "rm")
    policy = load_causal_lm(str(tmp_path / "sft"), tokenizer=qwen_tokenizer)
    ref = load_reference(str(tmp_path / "sft"), qwen_tokenizer)
    rm = freeze(load_reward_model(str(tmp_path / "rm")))
    value = ValueModel.from_scalar_model(rm)

    def dropouts(m):
        return [v for mod in m.modules() for k, v in vars(mod).items() if "dropout" in k and isinstance(v, float)]

    for m in (policy, ref, rm, value):
        assert dropouts(m) and all(p == 0.0 for p in dropouts(m))
    assert not any(p.requires_grad for p in list(ref.parameters()) + list(rm.parameters()))
    assert all(p.requires_grad for p in value.parameters())
