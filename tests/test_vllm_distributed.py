"""The vLLM rollout engine under several processes, on CPU: 2 gloo processes under torchrun
(``dist_vllm_script.py``), one in-process engine each (vLLM's ``external_launcher`` executor joining the
launcher's process group). After the FSDP2-sharded policy moves and is synced (its weights gathered
one at a time, at most one vLLM layer alive), every process's engine matches the whole model: greedy output token for token and fp32
sampling log-probs within 1e-4, tied ``lm_head``; the processes draw different samples from the same
seeded call, each repeatably. And GRPO under 2 processes with ``--run.fsdp --rollout-engine vllm``
trains, syncs and keeps step-0 KL exactly 0, and resumes identically; RLOO under 2 data-parallel (DDP)
processes trains and syncs likewise. Needs the ``vllm`` extra (``make test-vllm``)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vllm  # noqa: E402,F401  (collected only where the vllm extra is installed: conftest.py)

from conftest import free_port  # noqa: E402
from test_vllm_stages import vckpts  # noqa: E402,F401  (the tiny policy and reward model fixture)

pytestmark = pytest.mark.vllm
SCRIPT = Path(__file__).with_name("dist_vllm_script.py")


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``dist_vllm_script.py args`` under torchrun with 2 CPU processes; asserts it exited 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(SCRIPT), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_each_process_engine_matches_the_fsdp_policy_after_a_sync(tmp_path):
    torchrun("engine", str(tmp_path / "res"))
    ranks = [json.loads((tmp_path / f"res.{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["sharded"]  # the policy the engine was built from and synced from: FSDP2 DTensors
        assert r["vllm_start"] == r["hf_start"]
        assert r["hf_perturbed"] != r["hf_start"] and r["vllm_stale"] == r["hf_start"]  # not synced yet: the old weights
        assert r["vllm"] == r["hf"]  # token for token, 4 prompts x 16 tokens
        assert r["max_logprob_error"] < 1e-4
        assert 0 < r["sync_s"] < 30
        # one weight gathered at a time: of the 26 (embedding, 2 layers x 12, final norm) at most the 6 of
        # one vLLM layer (q, k, v weights and biases: qkv_proj) are alive at once, never the whole model
        assert r["gathered"] == 26 and r["most_alive"] <= 6
        assert r["samples"][0] == r["samples"][1]  # a seeded call repeats (a resumed run samples what the uninterrupted one did)
    assert ranks[0]["samples"][0] != ranks[1]["samples"][0]  # the same call, seed and prompts: each process its own draws


def updates(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "objective/scores" in line]


@pytest.fixture(scope="module")
def grpo_fsdp_run(vckpts, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("vgrpo2") / "run"
    torchrun("stage", "grpo", "fsdp", *vckpts, str(out))
    return out


@pytest.mark.parametrize("stage,mode", [("grpo", "fsdp"), ("rloo", "ddp")])
def test_rl_stage_under_two_processes_with_vllm(stage, mode, grpo_fsdp_run, vckpts, tmp_path):  # noqa: F811
    out = grpo_fsdp_run
    if (stage, mode) != ("grpo", "fsdp"):
        out = tmp_path / "run"
        torchrun("stage", stage, mode, *vckpts, str(out))
    ups = updates(out)
    assert [u["step"] for u in ups] == [1, 2]
    assert ups[0]["objective/kl"] == 0.0  # step 0: the training log-probs are the policy's, not the engine's
    assert ups[0][f"{stage}/first_minibatch_ratio_max_abs_dev"] == 0.0
    # each process's engine followed the update (an engine left on the old weights is off by far more)
    assert all(0 <= u["mismatch/logprob_abs_diff_max"] < 1e-4 for u in ups)
    assert 0 < ups[0]["perf/weight_sync_s"] < 30 and "perf/weight_sync_s" not in ups[1]
    assert (out / "final" / "model.safetensors").is_file()


def test_grpo_fsdp_with_vllm_resumes_identically(grpo_fsdp_run, vckpts, tmp_path):  # noqa: F811
    # each process's engine is rebuilt from the restored shards and its requests seeded as before: the
    # resumed second update samples, and trains, what the uninterrupted one did
    crashed = tmp_path / "run"
    shutil.copytree(grpo_fsdp_run, crashed)
    shutil.rmtree(crashed / "final")
    shutil.rmtree(crashed / "checkpoints" / "step-2", ignore_errors=True)
    assert (crashed / "checkpoints" / "step-1").is_dir()
    torchrun("stage", "grpo", "fsdp", *vckpts, str(crashed))
    a, b = load_file(grpo_fsdp_run / "final" / "model.safetensors"), load_file(crashed / "final" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    (u2,) = [u for u in updates(crashed) if u["step"] == 2]
    (o2,) = [u for u in updates(grpo_fsdp_run) if u["step"] == 2]
    for key in ("loss/policy", "objective/scores", "objective/kl", "mismatch/logprob_abs_diff_max"):
        assert u2[key] == o2[key], key
