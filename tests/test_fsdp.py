"""FSDP2 (``--run.fsdp``) on CPU with the gloo backend: every training stage under ``torchrun`` with 2
processes equals the run it replaces, resumes exactly after a kill, and holds half the trained state
per process. The stages run through the CLI in ``dist_fsdp_script.py`` (tiny models, real data).

Tolerances. FSDP reduce-scatters each micro-batch's gradients (an average over processes) where one
process sums them in one buffer, and DDP all-reduces them: the same sums in another order, which
changes float32 results in the last bits (about 1e-7 relative per addition). AdamW divides by the
gradient's running RMS, so these differences stay at that scale in the weights: measured, at most
2e-9 (SFT, 1 process vs 2), 3e-8 (RL stages, DDP vs FSDP). Sharded models also run the reward
model's and DPO's pair scoring on full rows where one process runs each query once on a key/value
cache (``fsdp.py``): again the same sums in another order. The tests allow 1e-6 on weights, and on
logged losses and statistics 2e-5 absolute or 2e-6 relative (DPO's summed log-probs are about -456:
float32 spacing there is 3e-5). A resume under FSDP on the same processes repeats the same
operations: exact (tolerance 0).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port

SCRIPT = Path(__file__).with_name("dist_fsdp_script.py")
SUPERVISED = ("sft", "rm", "dpo")
RL = ("ppo", "grpo", "rloo", "online-dpo")


def launch(ckpts, root: Path, mode: str, stages, *, processes: int = 2, env: dict | None = None, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``dist_fsdp_script.py`` on the tiny (SFT, reward model) ``ckpts`` under torchrun with
    ``processes`` CPU processes (or plain python for 1)."""
    args = [str(SCRIPT), *ckpts, str(root), mode, *stages]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)]), **(env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def assert_same_run(a: Path, b: Path, *, weight_atol: float, metric_atol: float) -> None:
    """Same records (steps and every logged number but timings and memory) and same final weights."""
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    compared = 0
    for x, y in zip(ra, rb):
        numbers = [k for k, v in x.items() if isinstance(v, float) and not k.startswith("perf/")]
        compared += len(numbers)
        for k in numbers:
            assert y[k] == pytest.approx(x[k], abs=metric_atol, rel=metric_atol / 10), (a.name, x["step"], k)
    assert compared >= 10, ra
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        if weight_atol == 0:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], atol=weight_atol, rtol=0)


@pytest.fixture(scope="module")
def supervised(ckpts, tmp_path_factory):
    """SFT, RM and DPO: 2 processes with FSDP, and 1 process without it, each process writing the
    bytes of DPO's trained parameters and AdamW moments it holds."""
    root = tmp_path_factory.mktemp("fsdp-supervised")
    launch(ckpts, root / "fsdp2", "fsdp", SUPERVISED, env={"FSDP_TEST_STATE_BYTES": str(root / "bytes-fsdp2")})
    launch(ckpts, root / "plain1", "ddp", SUPERVISED, processes=1, env={"FSDP_TEST_STATE_BYTES": str(root / "bytes-plain1")})
    return root


@pytest.fixture(scope="module")
def rl_runs(ckpts, tmp_path_factory):
    """PPO, GRPO, RLOO and online DPO on 2 processes, with FSDP and data-parallel (the processes
    sample the same rollouts in both: one process would sample others). The tiny policies never
    sample EOS, so the no-EOS penalty is off here (every score would be -1, every advantage 0)."""
    root = tmp_path_factory.mktemp("fsdp-rl")
    env = {"FSDP_TEST_NO_EOS_PENALTY": "1", "FSDP_TEST_DESYNC_RNG": "1"}
    launch(ckpts, root / "fsdp2", "fsdp", RL, env=env)
    launch(ckpts, root / "ddp2", "ddp", RL, env=env)
    return root


@pytest.mark.parametrize("stage", SUPERVISED)
def test_two_fsdp_processes_equal_one_process(supervised, stage):
    run = supervised / "fsdp2" / stage
    assert (run / "config.json").read_text().count('"fsdp": true') == 1
    assert_same_run(supervised / "plain1" / stage, run, weight_atol=1e-6, metric_atol=2e-5)
    # a sharded checkpoint: process 0's Hugging Face folder, both processes' shards, process 1's RNG
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    assert {"sharded", "state.pt", "rng-1.pt", "model.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


@pytest.mark.parametrize("stage", RL)
def test_rl_stages_under_fsdp_equal_data_parallel(rl_runs, ckpts, stage):
    assert_same_run(rl_runs / "ddp2" / stage, rl_runs / "fsdp2" / stage, weight_atol=1e-6, metric_atol=2e-5)
    # the runs learned something to compare: the policy moved from the SFT weights
    sft = load_file(Path(ckpts[0]) / "model.safetensors")
    moved = weights(rl_runs / "fsdp2" / stage)
    assert max((moved[k] - sft[k]).abs().max().item() for k in sft) > 1e-4


def test_fsdp_holds_half_the_trained_state_per_process(supervised):
    """DPO's trainable parameters and AdamW moments: each of 2 FSDP processes holds about half
    (shards are split on dim 0, so a 1-row bias sits whole on one process), and together exactly
    what one process holds without FSDP."""
    one = json.loads((supervised / "bytes-plain1.0.json").read_text())
    shards = [json.loads((supervised / f"bytes-fsdp2.{r}.json").read_text()) for r in (0, 1)]
    assert one["parameters"] == 2_431_392 * 4 and one["optimizer"] == 2 * one["parameters"]  # float32 weights, two moments
    for kind in ("parameters", "optimizer"):
        assert shards[0][kind] + shards[1][kind] == one[kind]
        for s in shards:
            assert 0.45 < s[kind] / one[kind] < 0.55


def test_kill_then_rerun_under_fsdp_is_exact(supervised, rl_runs, ckpts, tmp_path):
    """Both processes die right after SFT's step-2 checkpoint, then after PPO's step-1 checkpoint;
    rerunning the same command resumes each from its sharded checkpoint. Losses, statistics and
    final weights equal the uninterrupted FSDP runs' bit for bit (PPO: each process gets its own RNG
    state back, so the resumed rollouts sample the same tokens; the processes' states differ here)."""
    env = {"FSDP_TEST_NO_EOS_PENALTY": "1", "FSDP_TEST_DESYNC_RNG": "1"}
    killed = launch(ckpts, tmp_path, "fsdp", ("sft", "ppo"), env={**env, "FSDP_TEST_EXIT_AFTER_CHECKPOINT": "sft:2"}, expect_ok=False)
    assert killed.returncode != 0 and not (tmp_path / "sft" / "final").exists()
    assert sorted(c.name for c in (tmp_path / "sft" / "checkpoints").iterdir()) == ["step-1", "step-2"]
    killed = launch(ckpts, tmp_path, "fsdp", ("sft", "ppo"), env={**env, "FSDP_TEST_EXIT_AFTER_CHECKPOINT": "ppo:1"}, expect_ok=False)
    assert killed.returncode != 0 and (tmp_path / "sft" / "final" / "COMPLETE.json").exists() and not (tmp_path / "ppo" / "final").exists()
    launch(ckpts, tmp_path, "fsdp", ("sft", "ppo"), env=env)
    assert_same_run(supervised / "fsdp2" / "sft", tmp_path / "sft", weight_atol=0, metric_atol=0)
    assert_same_run(rl_runs / "fsdp2" / "ppo", tmp_path / "ppo", weight_atol=0, metric_atol=0)


def test_kill_then_rerun_data_parallel_rl_is_exact(rl_runs, ckpts, tmp_path):
    """The same without FSDP (DDP): every process's RNG state is in the checkpoint too (``rng-1.pt``
    beside ``state.pt``), so a killed 2-process PPO run resumes bit for bit."""
    env = {"FSDP_TEST_NO_EOS_PENALTY": "1", "FSDP_TEST_DESYNC_RNG": "1"}
    killed = launch(ckpts, tmp_path, "ddp", ("ppo",), env={**env, "FSDP_TEST_EXIT_AFTER_CHECKPOINT": "ppo:1"}, expect_ok=False)
    assert killed.returncode != 0 and (tmp_path / "ppo" / "checkpoints" / "step-1" / "rng-1.pt").exists()
    launch(ckpts, tmp_path, "ddp", ("ppo",), env=env)
    assert_same_run(rl_runs / "ddp2" / "ppo", tmp_path / "ppo", weight_atol=0, metric_atol=0)


def test_a_checkpoint_without_fsdp_is_refused_under_fsdp_in_one_line(rl_runs, ckpts, tmp_path):
    """A data-parallel run's checkpoint cannot be resumed with --run.fsdp (its optimizer state is
    not sharded): one line naming the checkpoint, nothing lost."""
    shutil.copytree(rl_runs / "ddp2" / "grpo", tmp_path / "grpo")
    shutil.rmtree(tmp_path / "grpo" / "final")
    proc = launch(ckpts, tmp_path, "fsdp", ("grpo",), env={"FSDP_TEST_NO_EOS_PENALTY": "1"}, expect_ok=False)
    assert proc.returncode != 0
    assert "checkpoints/step-1: written without --run.fsdp; resume it without --run.fsdp" in proc.stderr
    assert (tmp_path / "grpo" / "checkpoints" / "step-1" / "state.pt").exists()


def test_fsdp_without_a_launcher_is_one_process_and_changes_nothing(supervised, ckpts, tmp_path):
    """``--run.fsdp`` in a plain process (no torchrun): a 1-process group, every unit sharded over it,
    and the same run as without the flag, bit for bit (nothing is reduced over one process)."""
    launch(ckpts, tmp_path, "fsdp", ("sft",), processes=1)
    assert (tmp_path / "sft" / "checkpoints" / "step-2" / "sharded" / "__0_0.distcp").exists()
    assert_same_run(supervised / "plain1" / "sft", tmp_path / "sft", weight_atol=0, metric_atol=0)
