"""Helpers for the RL tests: tiny SFT-policy and reward-model checkpoints built from a config (real
Qwen2.5 tokenizer, via conftest's ``make_tiny_qwen2``) and a one-thread block for CPU speed."""

import atexit
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from conftest import EOS, POSTS, QWEN_TOKENIZER, make_tiny_qwen2  # noqa: F401  (re-exported)

TOK = str(QWEN_TOKENIZER)
POSTS = str(POSTS)


def tiny_config(seed: int = 0, hidden: int = 64):
    """The config of conftest's tiny Qwen2 (real vocabulary, 2 layers, pad = EOS)."""
    return make_tiny_qwen2(seed=seed, hidden=hidden).config


STAGE_HIDDEN = 16  # the stage tests train the whole model: a 151,665 x 16 embedding keeps them fast


_CHECKPOINTS: dict[str, tuple[str, str]] = {}


def make_checkpoints(tok) -> tuple[str, str]:
    """A tiny causal LM (the "SFT" policy, with the tokenizer) and a tiny ``ScalarRewardModel``
    (the project's reward model class) saved once per test session; returns their paths. Stages
    only read them."""
    from tldr_rlhf.reward.reward_model import RewardModelConfig, ScalarRewardModel

    if "paths" in _CHECKPOINTS:
        return _CHECKPOINTS["paths"]
    root = Path(tempfile.mkdtemp(prefix="tldr-rl-models-"))
    atexit.register(shutil.rmtree, root, True)
    sft, rm = root / "sft", root / "rm"
    make_tiny_qwen2(seed=0, hidden=STAGE_HIDDEN).save_pretrained(sft)
    tok.save_pretrained(sft)
    torch.manual_seed(1)
    ScalarRewardModel(RewardModelConfig(text_config=tiny_config(hidden=STAGE_HIDDEN))).save_pretrained(rm)
    tok.save_pretrained(rm)
    _CHECKPOINTS["paths"] = (str(sft), str(rm))
    return _CHECKPOINTS["paths"]


@contextmanager
def one_thread():
    """torch on one CPU thread for the block (the machine's cores are shared), restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def crashed_after_first_update(run_dir: str | Path, dest: str | Path) -> Path:
    """A copy of a finished two-update run folder as a crash after update 1 leaves it: no final/ and
    no checkpoints/step-2, only checkpoints/step-1. Returns ``dest``."""
    dest = Path(dest)
    shutil.copytree(run_dir, dest)
    shutil.rmtree(dest / "final")
    shutil.rmtree(dest / "checkpoints" / "step-2", ignore_errors=True)
    return dest


def model_reward(reward_model, device=torch.device("cpu"), autocast=None):
    """The RL stages' score function (``reward.specs.RLReward``) for one reward model of weight 1:
    the reward at the last real token, shared-prompt layout accepted."""
    from tldr_rlhf.reward.specs import RLReward, Term

    return RLReward([Term("rm", 1.0, "model", model=reward_model)], None, [], device=device, autocast=autocast)
