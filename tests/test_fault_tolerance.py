"""Nothing finished is ever lost: each fault made to happen for real on a real (tiny-model) SFT run
through the CLI, then the same command run again.

- SIGKILL at a random moment of training, SIGKILL half-way through writing a checkpoint, a full disk
  while the final model is written, Ctrl-C, a truncated newest checkpoint: the rerun finishes with
  final weights bit-identical to an uninterrupted run (same process layout, 1 thread: the resume
  restores weights, optimizer, scheduler, data order and RNG exactly, so not even rounding differs).
- ``--run.overwrite`` with a bad value, or a model that fails to load, keeps the old ``final/``.
- Bad input is one line naming the flag, exit code 2, no traceback, nothing created on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import POSTS, QWEN_TOKENIZER
from safetensors.torch import load_file

from tldr_rlhf import cli
from tldr_rlhf.checkpoints import COMPLETE, final_is_complete
from tldr_rlhf.train.run_dir import RunDir
from tldr_rlhf.errors import RunDirError

SCRIPT = Path(__file__).with_name("fault_sft_script.py")
STEPS = 8


def sft_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    """A real SFT run: 8 optimizer steps of 4 posts, a checkpoint every 2 steps (2 kept), 1 thread."""
    return [
        "sft", "--model.path", str(model_dir), "--data.train", str(POSTS), "--data.max-query-length", "96",
        "--data.limit", "32", "--data.valid-limit", "4", "--data.valid-fraction", "0.01",
        "--optim.lr", "1e-3", "--optim.min-lr", "1e-4", "--optim.warmup-steps", "1", "--optim.decay-steps", "0",
        "--run.output-dir", str(out), "--run.no-progress", "--run.eval-every", "0", "--run.save-every", "2",
        "--run.max-steps", str(STEPS), "--run.num-threads", "1", "--micro-batch-size", "2",
        "--gradient-accumulation-steps", "2", "--num-sample-posts", "0", *extra,
    ]


def run_cli(args: list[str], **fault: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **fault)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    assert final_is_complete(out / "final"), f"{out}/final is not complete"
    return load_file(out / "final" / "model.safetensors")


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss/sft" in line]


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every faulty run is compared with."""
    out = tmp_path_factory.mktemp("fault") / "straight"
    proc = run_cli(sft_args(tiny_model_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert logged_steps(out) == list(range(1, STEPS + 1))
    return out


def test_sigkill_at_a_random_moment_of_training_then_rerun_gives_identical_weights(reference, tiny_model_dir, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *sft_args(tiny_model_dir, out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait until step 3 is logged (the step-2 checkpoint exists), then kill -9 at a seeded random moment
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    time.sleep(random.Random(1234).uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before the kill: the test did not interrupt it"
    assert not final_is_complete(out / "final")

    rerun = run_cli(sft_args(tiny_model_dir, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr
    assert logged_steps(out) == list(range(1, STEPS + 1))  # replayed steps are logged once
    assert_identical(final_weights(out), final_weights(reference))


def test_sigkill_half_way_through_a_checkpoint_then_rerun_gives_identical_weights(reference, tiny_model_dir, tmp_path):
    out = tmp_path / "killed-in-save"
    proc = run_cli(sft_args(tiny_model_dir, out), FAULT_KILL_IN_SAVE="2")  # dies writing step-4
    assert proc.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert (ckpts / "step-2" / "state.pt").exists() and not (ckpts / "step-4").exists()
    assert (ckpts / ".tmp-step-4" / "state.pt").stat().st_size > 0  # the torn half-file, never taken for a checkpoint

    rerun = run_cli(sft_args(tiny_model_dir, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "checkpoints/step-2 (step 2)" in rerun.stderr
    assert_identical(final_weights(out), final_weights(reference))


def test_full_disk_while_writing_final_then_rerun_completes(reference, tiny_model_dir, tmp_path):
    out = tmp_path / "disk-full"
    proc = run_cli(sft_args(tiny_model_dir, out), FAULT_FULL_DISK_AT_FINAL="1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tldr-rlhf: error: [Errno 28] No space left on device")
    assert "newest checkpoint" in last and "step-6: rerun the same command to resume from step 6" in last
    assert "Traceback" not in proc.stderr
    # the half-written model never became final/: the run is not finished, and a stage check says so
    assert not (out / "final").exists()
    assert sorted(p.name for p in (out / ".final.tmp").iterdir()) == ["config.json"]
    from tldr_rlhf.pipeline import stage_done

    assert not stage_done(tmp_path, "disk-full")

    rerun = run_cli(sft_args(tiny_model_dir, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_identical(final_weights(out), final_weights(reference))
    marker = json.loads((out / "final" / COMPLETE).read_text())
    assert marker["stage"] == "sft" and marker["step"] == STEPS
    assert marker["files"]["model.safetensors"] == (out / "final" / "model.safetensors").stat().st_size


def test_ctrl_c_then_truncated_newest_checkpoint_falls_back_to_the_older_one(reference, tiny_model_dir, tmp_path):
    out = tmp_path / "truncated"
    proc = run_cli(sft_args(tiny_model_dir, out), FAULT_CTRL_C_AFTER_SAVE="2")  # Ctrl-C right after step-4
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tldr-rlhf: interrupted; newest checkpoint {out}/checkpoints/step-4: rerun the same command to resume from step 4"
    )
    assert "Traceback" not in proc.stderr
    newest = out / "checkpoints" / "step-4" / "state.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])  # a torn file, as a crash on a non-atomic file system leaves

    rerun = run_cli(sft_args(tiny_model_dir, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{newest}: unreadable checkpoint" in rerun.stderr and "falling back to an older checkpoint" in rerun.stderr
    assert "checkpoints/step-2 (step 2)" in rerun.stderr
    assert_identical(final_weights(out), final_weights(reference))


def test_overwrite_with_a_bad_value_or_a_failing_model_keeps_the_old_final(reference, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "finished"
    shutil.copytree(reference, out)
    before = tree_digest(out)

    # a bad value: refused before anything on disk is touched
    assert cli.main(sft_args(tiny_model_dir, out, "--run.overwrite", "--optim.lr", "-1")) == 2
    assert capsys.readouterr().err == "tldr-rlhf: error: --optim.lr -1.0: must be > 0\n"
    assert tree_digest(out) == before

    # a model that only fails once the run folder is open: the old run is put back
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen2", "vocab_size": 151665, "hidden_size": 64}')
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    assert cli.main(sft_args(tiny_model_dir, out, "--run.overwrite", "--model.path", str(broken), "--model.tokenizer", str(QWEN_TOKENIZER))) == 2
    assert capsys.readouterr().err.startswith(f"tldr-rlhf: error: cannot load model from '{broken}'")
    assert tree_digest(out) == before
    assert not (tmp_path / ".finished.replaced").exists()

    # killed after the old run was moved aside and before the new one checkpointed: the next open restores it
    RunDir(out, overwrite=True)
    assert not (out / "final").exists() and (tmp_path / ".finished.replaced" / "final" / COMPLETE).exists()
    with pytest.raises(RunDirError, match="already holds a finished run"):
        RunDir(out)
    assert tree_digest(out) == before


@pytest.mark.parametrize(
    "stage_args, message",
    [
        (["--optim.lr", "-1"], "--optim.lr -1.0: must be > 0"),
        (["--micro-batch-size", "0"], "--micro-batch-size 0: must be > 0"),
        (["--data.valid-fraction", "1.5"], "--data.valid-fraction 1.5: must be in (0, 1)"),
        (["--optim.min-lr", "0.5"], "--optim.min-lr 0.5: must not exceed --optim.lr 0.001"),
        (["--model.path", "/nonexistent/model"], "--model.path /nonexistent/model: model path does not exist"),
        (["--data.train", "data/posts.jsonl"], "--data.train data/posts.jsonl: file or folder does not exist"),
    ],
)
def test_bad_sft_input_is_one_line_naming_the_flag(stage_args, message, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(sft_args(tiny_model_dir, out, *stage_args)) == 2
    assert capsys.readouterr().err == f"tldr-rlhf: error: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["ppo", "--rollout-batch-size", "6", "--num-mini-batches", "4", "--total-episodes", "12"],
            "batch sizes: per-process rollout batch (6) must split exactly into num_mini_batches (4) with 1 process",
        ),
        (
            ["grpo", "--rollout-prompts", "3", "--group-size", "4", "--mini-batch-size", "8", "--micro-batch-size", "4", "--total-episodes", "24"],
            "batch sizes: per-process rollout sequences (12) must split exactly into the per-process minibatch (8) with 1 process",
        ),
        (["rloo", "--group-size", "1"], "--group-size 1: must be >= 2 (a group baseline needs two responses)"),
    ],
)
def test_rl_batch_sizes_that_do_not_divide_are_one_line(argv, message, qwen_tokenizer, tmp_path, capsys):
    from rl_fixtures import make_checkpoints

    sft, rm = make_checkpoints(qwen_tokenizer)
    capsys.readouterr()  # the checkpoints' own save output
    out = tmp_path / "run"
    paths = ["--sft-path", sft, "--rm-path", rm, "--data.train", str(POSTS), "--run.output-dir", str(out)]
    assert cli.main([argv[0], *paths, *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tldr-rlhf: error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_a_model_of_the_wrong_kind_is_one_line(qwen_tokenizer, tmp_path, capsys):
    from rl_fixtures import make_checkpoints

    sft, rm = make_checkpoints(qwen_tokenizer)
    capsys.readouterr()  # the checkpoints' own save output
    out = tmp_path / "run"
    assert cli.main(["ppo", "--sft-path", sft, "--rm-path", sft, "--data.train", str(POSTS), "--run.output-dir", str(out)]) == 2
    assert capsys.readouterr().err == f"tldr-rlhf: error: --rm-path {sft} is a causal LM policy, not a reward model\n"
    assert cli.main(["grpo", "--sft-path", rm, "--rm-path", rm, "--data.train", str(POSTS), "--run.output-dir", str(out)]) == 2
    assert capsys.readouterr().err == f"tldr-rlhf: error: --sft-path {rm} is a reward model, not a policy\n"
    assert not out.exists()


def test_an_output_folder_that_cannot_be_written_is_one_line(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(sft_args(tiny_model_dir, blocker / "run")) == 2
    assert capsys.readouterr().err == f"tldr-rlhf: error: --run.output-dir {blocker / 'run'}: cannot write there (Not a directory)\n"
