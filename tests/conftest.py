"""Shared fixtures: the real Qwen2.5 tokenizer, tiny models built from a config, the real data paths."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
QWEN_TOKENIZER = SHARED / "tokenizers" / "qwen2.5"
TLDR = SHARED / "data" / "tldr"
POSTS = TLDR / "posts" / "valid_sample.jsonl"
COMPARISONS = TLDR / "comparisons" / "batch13.json"
CNNDM = TLDR / "comparisons" / "cnndm0.json"
POLICY_SAMPLES = TLDR / "policy_samples" / "openai_ppo_1.3b.jsonl"
SMOL_GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS = 151643  # <|endoftext|>: Qwen2.5's EOS and pad

# The vLLM tests run in the vllm extra's own venv (make test-vllm, the second block of .ci/run) and are
# deselected by marker elsewhere. Where vllm is not installed their modules are not collected at all,
# instead of being reported as skipped; where it is, they import it unconditionally, so a broken vLLM
# install fails the vllm run (and an empty one exits 5, which fails it too) rather than skipping it.
if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_vllm_*.py"]


if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on a 2-core machine: one thread each
    torch.set_num_threads(1)


# what accelerate reads to decide that a process is one of several (LOCAL_RANK set, or WORLD_SIZE > 1); vLLM sets
# LOCAL_WORLD_SIZE=1 in the process of an in-process engine, which is harmless
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@pytest.fixture(autouse=True)
def launcher_env_unchanged():
    """Fails a test that leaves torchrun's variables changed in this process: accelerate reads them, so
    every later Accelerator in the same test worker would take itself for one of several processes and
    fail (``MASTER_ADDR expected``), far from the test that leaked them. The variables are put back."""
    before = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    yield
    after = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert after == before, f"the test changed the launcher's environment variables: {before} -> {after}"


def free_port() -> int:
    """A TCP port nothing listens on now, for a 2-process test's ``--master_port``: fixed ports collide
    when test workers (pytest-xdist) run such tests at the same time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from tldr_rlhf.modeling import load_tokenizer

    return load_tokenizer(str(QWEN_TOKENIZER))


def make_tiny_qwen2(vocab_size: int = 151665, *, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A tiny random Qwen2 causal LM (real vocabulary so real token ids fit), dropout off."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tldr_rlhf.modeling import disable_dropout

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=EOS, eos_token_id=EOS, bos_token_id=None,
    )
    return disable_dropout(Qwen2ForCausalLM(cfg))


@pytest.fixture
def tiny_model():
    return make_tiny_qwen2()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, qwen_tokenizer):
    """A saved tiny Qwen2 checkpoint + tokenizer folder, loadable by every stage's --model.path."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model = make_tiny_qwen2()
    model.save_pretrained(path)
    qwen_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def reward_backbone_dir(tmp_path_factory, qwen_tokenizer):
    """A saved tiny Qwen2 causal LM (seed 3) + tokenizer: the backbone the reward-model tests build
    reward models from (``build_reward_model``), as the stage builds one from an SFT checkpoint."""
    from tldr_rlhf.modeling import save_pretrained

    path = tmp_path_factory.mktemp("tiny-lm")
    save_pretrained(make_tiny_qwen2(seed=3), qwen_tokenizer, path)
    return str(path)


@pytest.fixture(scope="module")
def one_thread_per_module():
    """torch on one CPU thread for a whole test module (the machine's cores are shared); a module
    takes it with ``pytestmark = pytest.mark.usefixtures("one_thread_per_module")``."""
    from rl_fixtures import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="module")
def ckpts(qwen_tokenizer):
    """(SFT policy path, reward model path): the session's tiny checkpoints (``rl_fixtures.make_checkpoints``)."""
    from rl_fixtures import make_checkpoints

    return make_checkpoints(qwen_tokenizer)
