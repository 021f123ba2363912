"""Issue 27, item 4: the last tracebacks and wrong outcomes a new user met, each one line or the right
outcome: a binary data file, a tokenizer larger than the model, a full disk inside safetensors' writer,
an empty output folder, a damaged final/ with its COMPLETE.json, a failed push, accelerate's mixed
precision, --run.fsdp on one process, and two stale messages."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import POSTS, QWEN_TOKENIZER

from tldr_rlhf import cli
from tldr_rlhf.checkpoints import COMPLETE, final_is_complete, final_problem
from tldr_rlhf.config import ModelArgs, OptimArgs, RunArgs, SFTConfig, TldrDataArgs
from tldr_rlhf.errors import ConfigError
from tldr_rlhf.train import common, sft
from tldr_rlhf.validation import check_launcher_precision

SAFETENSORS_SCRIPT = Path(__file__).with_name("fault_safetensors_script.py")


def _cfg(model_dir, out, **run) -> SFTConfig:
    """A 2-step tiny SFT run with a checkpoint at every step."""
    return SFTConfig(
        model=ModelArgs(path=str(model_dir)),
        data=TldrDataArgs(train=str(POSTS), max_query_length=96, limit=16, valid_limit=4, valid_fraction=0.01),
        optim=OptimArgs(lr=1.7e-3, min_lr=1e-4, warmup_steps=1, decay_steps=0),
        run=RunArgs(output_dir=str(out), progress=False, eval_every=0, num_threads=1, **{"save_every": 1, "max_steps": 2, **run}),
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        num_sample_posts=0,
    )


def _argv(model_dir, out, *extra) -> list[str]:
    """``_cfg`` as command-line flags."""
    return [
        "sft", "--model.path", str(model_dir), "--data.train", str(POSTS), "--data.max-query-length", "96", "--data.limit", "16",
        "--data.valid-limit", "4", "--data.valid-fraction", "0.01", "--optim.lr", "1.7e-3", "--optim.min-lr", "1e-4",
        "--optim.warmup-steps", "1", "--optim.decay-steps", "0", "--run.output-dir", str(out), "--run.no-progress",
        "--run.eval-every", "0", "--run.num-threads", "1", "--run.save-every", "1", "--run.max-steps", "2",
        "--micro-batch-size", "2", "--gradient-accumulation-steps", "2", "--num-sample-posts", "0", *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "sft"
    sft.train(_cfg(tiny_model_dir, out))
    return out


def test_a_binary_data_file_is_one_line_naming_it(tmp_path, capsys):
    data = tmp_path / "posts.jsonl"
    data.write_bytes(b"\n" + bytes([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0xFF, 0x00]) + b"\n")  # a PNG header, on line 2
    assert cli.main(["stats", "--posts", str(data), "--tokenizer", str(QWEN_TOKENIZER)]) == 2
    assert capsys.readouterr().err == f"tldr-rlhf: error: {data}:2: not UTF-8 text (byte 0x89 at column 1); expected JSON lines, is it a binary file?\n"


def test_a_tokenizer_larger_than_the_model_is_one_line(qwen_tokenizer, tmp_path, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    small = tmp_path / "small-vocab"
    cfg = Qwen2Config(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    Qwen2ForCausalLM(cfg).save_pretrained(small)
    qwen_tokenizer.save_pretrained(small)  # 151665 tokens for 1000 embedding rows
    assert cli.main(["generate", "--model", str(small), "--post", "I adopted a cat."]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"tldr-rlhf: error: the tokenizer has 151665 tokens but the model '{small}' has only 1000 embedding rows (ids up to 999); "
        "give the model's own tokenizer (--model.tokenizer / --tokenizer)"
    )


def test_a_full_disk_inside_safetensors_is_one_line_and_the_run_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "disk-full"
    env = dict(os.environ, OMP_NUM_THREADS="1", FAULT_SAFETENSORS_FULL_AT_FINAL="1")
    proc = subprocess.run([sys.executable, str(SAFETENSORS_SCRIPT), *_argv(tiny_model_dir, out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tldr-rlhf: error: [Errno 28] No space left on device (writing safetensors weights); newest checkpoint {out / 'checkpoints' / 'step-1'}: "
        "rerun the same command to resume from step 1 (--debug shows the traceback)"
    )
    assert not (out / "final").exists()
    env.pop("FAULT_SAFETENSORS_FULL_AT_FINAL")
    rerun = subprocess.run([sys.executable, str(SAFETENSORS_SCRIPT), *_argv(tiny_model_dir, out)], capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr and final_is_complete(out / "final")
    assert json.loads((out / "final" / COMPLETE).read_text())["step"] == 2


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_output_dir_is_refused(tmp_path, monkeypatch, capsys, value):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sft", "--run.output-dir", value]) == 2
    assert capsys.readouterr().err == f"tldr-rlhf: error: --run.output-dir '{value}': needs a folder name (empty would write the run into the current folder)\n"
    assert list(tmp_path.iterdir()) == []
    from tldr_rlhf.config import EvaluateConfig, PipelineConfig
    from tldr_rlhf.validation import validate_config

    with pytest.raises(ConfigError, match="^--output-dir '.*': needs a folder name"):
        validate_config(EvaluateConfig(output_dir=value), check_paths=False)
    with pytest.raises(ConfigError, match="^--run-dir '.*': needs a folder name"):
        validate_config(PipelineConfig(run_dir=value), check_paths=False)


def test_complete_json_records_sizes_and_hashes_and_a_damaged_final_is_not_finished(finished_run, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    final = run / "final"
    marker = json.loads((final / COMPLETE).read_text())
    assert marker["files"]["model.safetensors"] == (final / "model.safetensors").stat().st_size
    assert marker["sha256"]["config.json"] == __import__("hashlib").sha256((final / "config.json").read_bytes()).hexdigest()
    assert "model.safetensors" not in marker["sha256"] and final_is_complete(final)  # large files: sizes only

    # an edited config of the same length: the hash says so
    text = (final / "config.json").read_text()
    (final / "config.json").write_text(text.replace('"hidden_size": 64', '"hidden_size": 65'))
    assert final_problem(final) == f"config.json is not the file that was written (sha256 differs from {COMPLETE})"
    (final / "config.json").write_text(text)
    assert final_is_complete(final)
    # truncated weights: the size says so; the run is not finished, a later stage refuses it in one line
    with open(final / "model.safetensors", "r+b") as f:
        f.truncate(marker["files"]["model.safetensors"] // 2)
    assert final_problem(final) == f"model.safetensors has {marker['files']['model.safetensors'] // 2} bytes, {COMPLETE} recorded {marker['files']['model.safetensors']}"
    assert not final_is_complete(final)
    assert cli.main(["dpo", "--sft-path", str(final), "--data.comparisons", str(POSTS), "--run.output-dir", str(tmp_path / "dpo")]) == 2
    assert f"--sft-path {final}: the run's final/ is incomplete (model.safetensors has" in capsys.readouterr().err
    # rerunning the stage is not refused as "finished": it resumes from its last checkpoint and writes final/ again
    assert cli.main(_argv(tiny_model_dir, run)) == 0
    assert final_is_complete(final) and json.loads((final / COMPLETE).read_text())["step"] == 2


def test_a_failed_push_exits_non_zero_after_the_run_is_saved(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    def unreachable(self, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    out = tmp_path / "pushed"
    assert cli.main(_argv(tiny_model_dir, out, "--run.push-to-hub", "me/tiny")) == 1
    assert final_is_complete(out / "final")  # saved first
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("tldr-rlhf: error: --run.push-to-hub: push to me/tiny failed (OSError: network is unreachable)")
    assert last.endswith(f"then run: tldr-rlhf push {out / 'final'} me/tiny (the run is saved in {out / 'final'})")


@pytest.mark.parametrize(("env", "cfg", "message"), [
    ("bf16", SFTConfig(), "accelerate's mixed precision bf16 (ACCELERATE_MIXED_PRECISION, from accelerate launch --mixed_precision or its config) is not applied: tldr-rlhf trains in --model.dtype auto; pass --model.dtype bfloat16"),
    ("bf16", SFTConfig(model=ModelArgs(dtype="float32")), "is not applied: tldr-rlhf trains in --model.dtype float32; pass --model.dtype bfloat16"),
    ("fp16", SFTConfig(model=ModelArgs(dtype="bfloat16")), "accelerate's mixed precision fp16 (ACCELERATE_MIXED_PRECISION, from accelerate launch --mixed_precision or its config): tldr-rlhf has no fp16; launch with --mixed_precision no (or bf16) and set the precision with --model.dtype"),
])
def test_accelerate_mixed_precision_that_would_be_ignored_is_refused(env, cfg, message):
    if torch.cuda.is_available() and cfg.model.dtype == "auto":
        pytest.skip("auto is bf16 on CUDA: the launcher's bf16 is what the run does")
    with pytest.raises(ConfigError, match="^" + __import__("re").escape(message) + "$" if message.startswith("accelerate") else __import__("re").escape(message)):
        check_launcher_precision(cfg, {"ACCELERATE_MIXED_PRECISION": env})


def test_accelerate_mixed_precision_that_the_run_gives_passes_and_the_cli_refuses_the_rest(tmp_path, monkeypatch, capsys):
    from tldr_rlhf.config import PPOConfig

    check_launcher_precision(SFTConfig(model=ModelArgs(dtype="bfloat16")), {"ACCELERATE_MIXED_PRECISION": "bf16"})
    check_launcher_precision(SFTConfig(model=ModelArgs(dtype="float32")), {"ACCELERATE_MIXED_PRECISION": "no"})
    with pytest.raises(ConfigError, match="trains in --dtype float32; pass --dtype bfloat16$"):  # the stages whose flag is --dtype
        check_launcher_precision(PPOConfig(dtype="float32"), {"ACCELERATE_MIXED_PRECISION": "bf16"})
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sft", "--model.dtype", "float32", "--run.output-dir", "r"]) == 2
    assert capsys.readouterr().err.startswith("tldr-rlhf: error: accelerate's mixed precision bf16")
    assert list(tmp_path.iterdir()) == []


def test_fsdp_on_one_process_says_it_shards_nothing(monkeypatch, caplog):
    monkeypatch.setattr(common.fsdp, "shard_model", lambda model, device: model)  # the hint, not the sharding
    accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=True)
    model = torch.nn.Linear(2, 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level(logging.WARNING):
        common.shard_if_asked(model, RunArgs(fsdp=True), accelerator)
    hints = [r.getMessage() for r in caplog.records if "--run.fsdp" in r.getMessage()]
    assert hints == ["--run.fsdp with one process shards nothing (every weight stays on this process); launch several with torchrun --nproc_per_node N or accelerate launch --num_processes N"]
    caplog.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.WARNING):
        common.shard_if_asked(model, RunArgs(fsdp=True), accelerator)
    assert not [r for r in caplog.records if "shards nothing" in r.getMessage()]


def test_overwrite_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        cli.parse(["sft", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(deletes it)" not in text
    assert "the old run is moved aside (.NAME.replaced) and deleted once the new run has its first checkpoint" in text


def test_ctrl_c_after_an_overwrite_was_restored_says_so(finished_run, tiny_model_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "load_policy", ctrl_c)  # after the old run was moved aside, before any checkpoint
    assert cli.main(_argv(tiny_model_dir, run, "--run.overwrite")) == 130
    assert final_is_complete(run / "final")  # the old run is back
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"tldr-rlhf: interrupted; {run} holds the previous run again (the --run.overwrite run stopped before its first checkpoint): "
        "rerun the same command to start the new run afresh"
    )


def test_a_full_disk_inside_torch_save_is_one_line_and_the_run_resumes(tiny_model_dir, tmp_path, monkeypatch, capsys, caplog):
    """torch's zip writer meets a full disk while writing step 2's state.pt (of 3 steps): it raises a RuntimeError with
    no errno (the message below is what torch 2.13 raised on a full 64 KiB tmpfs). The CLI ends with one
    line, the [Errno 28] and where to resume; step 1 stays the newest checkpoint and a rerun finishes."""
    from tldr_rlhf.train import checkpointing

    out = tmp_path / "torch-full"
    real_save, real_usage = torch.save, shutil.disk_usage

    def full_disk(obj, path, *a, **k):
        if Path(path).parent.name == ".tmp-step-2":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=4096))
    assert cli.main(_argv(tiny_model_dir, out, "--run.max-steps", "3")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"tldr-rlhf: error: [Errno 28] No space left on device: '{out / 'checkpoints' / '.tmp-step-2' / 'state.pt'}'; newest checkpoint "
        f"{out / 'checkpoints' / 'step-1'}: rerun the same command to resume from step 1 (--debug shows the traceback)"
    )
    monkeypatch.setattr(torch, "save", real_save)
    with caplog.at_level(logging.INFO):
        assert cli.main(_argv(tiny_model_dir, out, "--run.max-steps", "3")) == 0
    assert f"resumed from {out / 'checkpoints' / 'step-1'}" in caplog.text and json.loads((out / "final" / COMPLETE).read_text())["step"] == 3


def test_a_torch_write_failure_with_room_left_is_an_io_error_naming_the_file(tmp_path, monkeypatch):
    from tldr_rlhf.train.checkpointing import write_torch

    monkeypatch.setattr(torch, "save", lambda obj, path: (_ for _ in ()).throw(RuntimeError("[enforce fail at inline_container.cc:588] . PytorchStreamWriter failed writing file data/0")))
    with pytest.raises(OSError, match=r"\[Errno 5\] torch.save failed \(\[enforce fail at inline_container.cc:588\] . PytorchStreamWriter failed writing file data/0\): '.*x.pt'"):
        write_torch({"a": 1.7}, tmp_path / "x.pt")
    monkeypatch.setattr(torch, "save", lambda obj, path: (_ for _ in ()).throw(RuntimeError("some other bug")))
    with pytest.raises(RuntimeError, match="some other bug"):  # not torch's writer: a bug, its traceback shown
        write_torch({"a": 1.7}, tmp_path / "x.pt")
