"""vLLM's sleep mode around the policy update (``rollout_engine.VLLMEngine.sleep``), without vLLM: a
stand-in for ``vllm.LLM`` records what the engine asks of it (sleep(level=1) after a rollout on CUDA,
the weights woken before a sync, the KV cache before the next rollout; nothing on the CPU), and a
recording engine checks that the GRPO and PPO loops put it to sleep after every rollout, before the
update and the sync. The real CUDA path (vLLM freeing and restoring GPU memory) is not tested here:
this machine has no GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tldr_rlhf.config import GRPOConfig, OptimArgs, PPOConfig, RunArgs, TldrDataArgs
from tldr_rlhf.rollout_engine import HFEngine, VLLMEngine
from tldr_rlhf.train import group_rl, grpo, ppo

from rl_fixtures import POSTS

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


class FakeLLM:
    """Records the calls the engine makes of ``vllm.LLM``; ``generate`` answers each prompt with one
    response [7, 8] of log-probs (-0.5, -1.7)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append("generate")
        out = SimpleNamespace(index=0, token_ids=[7, 8], logprobs=[{7: SimpleNamespace(logprob=-0.5)}, {8: SimpleNamespace(logprob=-1.7)}])
        return [SimpleNamespace(outputs=[out]) for _ in prompts]

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method, kwargs):
        self.calls.append(method)

    def apply_model(self, fn):
        self.calls.append("apply_model")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


def fake_engine(*, cuda: bool) -> VLLMEngine:
    """A VLLMEngine around a ``FakeLLM``, as ``__init__`` leaves it on CUDA (sleep mode on) or the CPU."""
    engine = object.__new__(VLLMEngine)
    engine.llm, engine._vllm = FakeLLM(), SimpleNamespace(SamplingParams=lambda **kw: kw)
    engine.sleep_mode, engine.asleep = cuda, set()
    return engine


def rollout(engine):
    return engine.sample_groups(None, [[1, 2, 3]], 1, eos_token_id=0, pad_token_id=0, max_new_tokens=2, temperature=0.7, seed=3)


def test_cuda_sleep_frees_after_the_rollout_and_wakes_weights_for_the_sync_then_the_cache():
    engine, policy = fake_engine(cuda=True), torch.nn.Linear(2, 2)
    assert rollout(engine) == ([[7, 8]], [[-0.5, -1.7]])
    engine.sleep()
    engine.sleep()  # already asleep: nothing more
    engine.sync_weights(policy)
    rollout(engine)
    engine.sleep()
    rollout(engine)  # woken whole when no sync came between (the last update, evaluate)
    assert engine.llm.calls == [
        "generate", ("sleep", 1),
        ("wake_up", ("weights",)), "reload_weights", "apply_model", "reset_prefix_cache",
        ("wake_up", ("kv_cache",)), "generate",
        ("sleep", 1), ("wake_up", ("weights", "kv_cache")), "generate",
    ]


def test_cpu_has_no_sleep_mode():
    engine = fake_engine(cuda=False)
    rollout(engine)
    engine.sleep()
    engine.sync_weights(torch.nn.Linear(2, 2))
    rollout(engine)
    assert engine.llm.calls == ["generate", "reload_weights", "apply_model", "reset_prefix_cache", "generate"]
    HFEngine().sleep()  # the hf engine has nothing to free


class RecordingEngine(HFEngine):
    """The hf sampler under another name (so the loops treat it as an engine with weights of its own:
    synced after each update), recording the loop's calls."""

    name = "recording"

    def __init__(self):
        self.calls = []

    def sample_groups(self, *args, **kwargs):
        self.calls.append("sample")
        return super().sample_groups(*args, **kwargs)

    def sleep(self):
        self.calls.append("sleep")

    def sync_weights(self, policy):
        self.calls.append("sync")
        return 0.0

    def close(self):
        self.calls.append("close")


def common(sft, rm, out):
    return dict(
        sft_path=sft, rm_path=rm, dtype="float32",
        data=TldrDataArgs(train=POSTS, limit=8, max_query_length=64, valid_fraction=0.1),
        optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=0, max_grad_norm=1.0),
        run=RunArgs(output_dir=str(out), save_every=0, eval_every=0, progress=False, num_threads=1),
        forward_batch_size=8, response_length=4, num_sample_posts=0,
    )


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_the_loops_put_the_engine_to_sleep_after_each_rollout(stage, ckpts, tmp_path, monkeypatch):
    engine = RecordingEngine()
    module = {"grpo": grpo, "ppo": ppo}[stage]
    monkeypatch.setattr(group_rl if stage == "grpo" else ppo, "open_engine", lambda *a, **k: engine)
    if stage == "grpo":
        cfg = GRPOConfig(**common(*ckpts, tmp_path / "run"), rollout_prompts=2, group_size=2, micro_batch_size=2, total_episodes=8, mini_batch_size=4, update_per_rollout=1)
    else:
        cfg = PPOConfig(**common(*ckpts, tmp_path / "run"), total_episodes=4, rollout_batch_size=2, num_mini_batches=1, micro_batch_size=2, ppo_epochs=1)
    module.train(cfg)
    # two updates: rollout, sleep, (update), sync; the last update is not synced
    assert engine.calls == ["sample", "sleep", "sync", "sample", "sleep", "close"]
