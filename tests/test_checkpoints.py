"""Loadable, safely loaded checkpoints: each ``checkpoints/step-N/`` is a Hugging Face folder that
``generate`` and ``from_pretrained`` load, plus a ``state.pt`` read with ``torch.load(weights_only=True)``
that refuses a pickle naming code; ``final/`` in the training dtype when that is bfloat16."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import POSTS, make_tiny_qwen2
from safetensors import safe_open
from safetensors.torch import load_file
from test_fault_tolerance import final_weights, run_cli, sft_args

from tldr_rlhf import cli
from tldr_rlhf.config import ModelArgs
from tldr_rlhf.modeling import save_pretrained
from tldr_rlhf.precision import saved_weights_dtype
from tldr_rlhf.checkpoints import COMPLETE, final_is_complete
from tldr_rlhf.train import sft
from tldr_rlhf.train.loop import build_optimizer, build_scheduler
from tldr_rlhf.train.checkpointing import UnsafeCheckpointError, load_checkpoint, save_checkpoint
from tldr_rlhf.train.run_dir import RunDir

from test_sft import _cfg


def dtypes(folder: Path) -> set[torch.dtype]:
    return {t.dtype for t in load_file(folder / "model.safetensors").values()}


def state(folder: Path) -> dict:
    return torch.load(folder / "state.pt", weights_only=True)


class Evil:
    """Unpickling this writes a marker file: what a tampered state.pt could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_sft_checkpoints_are_loadable_models_with_safe_state(tiny_model_dir, qwen_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    sft.train(_cfg(tiny_model_dir, out, max_steps=4, save_every=1, keep_checkpoints=2))
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-3"]  # step-1 pruned, none after the last step
    step3 = ckpts / "step-3"
    names = sorted(p.name for p in step3.iterdir())
    for f in ("config.json", "generation_config.json", "model.safetensors", "state.pt", "tokenizer.json", "tokenizer_config.json"):
        assert f in names
    assert COMPLETE not in names and not final_is_complete(step3)  # never taken for a finished run
    assert torch.serialization.get_unsafe_globals_in_checkpoint(step3 / "state.pt") == []
    s = state(step3)
    assert s["format"] == 2 and s["step"] == 3
    # float32 training, float32 folder: every trainable tensor is read back from the folder, none stored twice
    assert s["model"] == {}
    assert sorted(s["model_from_weights"]) == sorted(load_file(step3 / "model.safetensors"))
    assert dtypes(step3) == dtypes(out / "final") == {torch.float32}

    # the folder is an ordinary Hugging Face checkpoint: it loads and generates
    model = AutoModelForCausalLM.from_pretrained(step3)
    weights = load_file(step3 / "model.safetensors")
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, weights["model.layers.0.mlp.up_proj.weight"])
    copy = tmp_path / "plain-save"  # the same weights saved the ordinary way
    save_pretrained(model, qwen_tokenizer, copy)
    summaries = {}
    for name, folder in (("checkpoint", step3), ("copy", copy)):
        f = tmp_path / f"{name}.jsonl"
        assert cli.main(["generate", "--model", str(folder), "--posts", str(POSTS), "--limit", "2", "--max-new-tokens", "4", "--greedy", "--output", str(f)]) == 0
        summaries[name] = [json.loads(line) for line in f.read_text().splitlines()]
    assert [r["id"] for r in summaries["checkpoint"]] == ["oai1b-0000", "oai1b-0001"]
    assert summaries["checkpoint"] == summaries["copy"]

    # a run folder with checkpoints and no final/ is resumable, not finished
    shutil.rmtree(out / "final")
    assert RunDir(out).latest_checkpoint() == step3


def test_refused_and_old_checkpoints_through_the_cli(tiny_model_dir, tmp_path):
    """A resume whose newest state.pt names code stops with one line (no fall-back, nothing run); a
    checkpoint of the older pickled format is refused the same way unless --run.trust-checkpoint,
    with which the run resumes to final weights identical to an uninterrupted run."""
    out = tmp_path / "run"
    assert run_cli(sft_args(tiny_model_dir, out)).returncode == 0  # 8 steps; checkpoints step-4, step-6
    reference = final_weights(out)
    shutil.rmtree(out / "final")
    newest = out / "checkpoints" / "step-6" / "state.pt"
    good = state(newest.parent)

    marker = tmp_path / "pwned"
    torch.save({**good, "extra": {"x": Evil(marker)}}, newest)
    proc = run_cli(sft_args(tiny_model_dir, out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tldr-rlhf: error: {newest}: refused: loading it would run pickled code (posix.system), and a tldr-rlhf checkpoint "
        "holds only tensors, numbers and strings; not falling back to an older checkpoint (an altered file is no crash "
        f"artifact): delete {newest.parent} to resume from the one before, or pass --run.overwrite to start afresh"
    )
    assert not marker.exists() and not (out / "final").exists()

    # the format of tldr-rlhf before this change: all trainable weights and numpy's RNG tuple pickled
    folder = load_file(newest.parent / "model.safetensors")
    old = {k: v for k, v in good.items() if k not in ("format", "model_from_weights")}
    old["model"] = {k: folder[name] for k, (_, name) in good["model_from_weights"].items()}
    n = good["rng"]["numpy"]
    old["rng"] = {**good["rng"], "numpy": (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])}
    torch.save(old, newest)
    proc = run_cli(sft_args(tiny_model_dir, out))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tldr-rlhf: error: {newest}: a checkpoint of an older tldr-rlhf, whose loading runs pickled code (numpy.")
    assert last.endswith("if you wrote it yourself, rerun with --run.trust-checkpoint to load it, or pass --run.overwrite to start afresh")

    proc = run_cli(sft_args(tiny_model_dir, out, "--run.trust-checkpoint"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoints/step-6 (step 6)" in proc.stderr
    resumed = final_weights(out)
    assert sorted(resumed) == sorted(reference) and all(torch.equal(resumed[k], reference[k]) for k in reference)


def _tiny_run(tmp_path: Path):
    model = make_tiny_qwen2()
    from tldr_rlhf.config import OptimArgs

    optimizer = build_optimizer(model.parameters(), OptimArgs(lr=1e-3))
    scheduler = build_scheduler(optimizer, OptimArgs(lr=1e-3), 10)
    return RunDir(tmp_path / "run"), model, optimizer, scheduler


def test_a_refused_file_does_not_fall_back_but_a_torn_one_does(tmp_path, qwen_tokenizer):
    run, model, optimizer, scheduler = _tiny_run(tmp_path)
    save = lambda folder: save_pretrained(model, qwen_tokenizer, folder)  # noqa: E731
    save_checkpoint(run, 2, model, optimizer, scheduler, keep=5, save_weights=save)
    step4 = save_checkpoint(run, 4, model, optimizer, scheduler, keep=5, save_weights=save)
    good = (step4 / "state.pt").read_bytes()

    marker = tmp_path / "pwned"
    torch.save({"step": 4, "model": {}, "optimizer": Evil(marker), "scheduler": {}, "rng": {}}, step4 / "state.pt")
    with pytest.raises(UnsafeCheckpointError, match=f"^{step4 / 'state.pt'}: refused: loading it would run pickled code \\(posix.system\\)"):
        load_checkpoint(step4, model, optimizer, scheduler)
    assert not marker.exists()

    (step4 / "state.pt").write_bytes(good[: len(good) // 3])  # torn by a crash: the older one is used
    assert load_checkpoint(step4, model, optimizer, scheduler)["path"].name == "step-2"
    (step4 / "state.pt").write_bytes(good)
    (step4 / "model.safetensors").write_bytes(b"torn")  # weights torn: the older one too
    assert load_checkpoint(step4, model, optimizer, scheduler)["path"].name == "step-2"


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path, qwen_tokenizer):
    import random

    run, model, optimizer, scheduler = _tiny_run(tmp_path)
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.normal()  # numpy now holds a cached Gaussian
    ckpt = save_checkpoint(run, 1, model, optimizer, scheduler, extra={"n": 1, "t": torch.ones(2)}, save_weights=lambda f: save_pretrained(model, qwen_tokenizer, f))
    want = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    s = load_checkpoint(ckpt, model, optimizer, scheduler)
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])
    assert s["extra"]["n"] == 1 and torch.equal(s["extra"]["t"], torch.ones(2))


def test_lora_checkpoint_holds_merged_weights_and_the_adapters_in_state(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny_model_dir, tmp_path / "run", max_steps=2, save_every=1)
    cfg = replace(cfg, model=ModelArgs(path=str(tiny_model_dir), lora_r=4, lora_alpha=8))
    sft.train(cfg)
    step1 = tmp_path / "run" / "checkpoints" / "step-1"
    s = state(step1)
    assert s["model_from_weights"] == {} and s["model"] and all("lora_" in k for k in s["model"])
    saved = load_file(step1 / "model.safetensors")
    assert not any("lora" in k for k in saved)  # merged, as in final/
    AutoModelForCausalLM.from_pretrained(step1)


def test_saved_weights_dtype_follows_the_training_precision(monkeypatch):
    assert saved_weights_dtype("float32") == torch.float32
    assert saved_weights_dtype("bfloat16") == torch.bfloat16
    assert saved_weights_dtype("bfloat16", fp32=True) == torch.float32
    assert saved_weights_dtype("auto") == torch.float32  # CPU: float32 training
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert saved_weights_dtype("auto") == torch.bfloat16  # CUDA: bf16 autocast
    assert saved_weights_dtype("auto", fp32=True) == torch.float32


def test_save_pretrained_casts_a_copy_and_keeps_tied_weights_once(tmp_path, qwen_tokenizer):
    from transformers import AutoModelForCausalLM

    model = make_tiny_qwen2()
    save_pretrained(model, qwen_tokenizer, tmp_path / "bf16", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32  # the trained model is untouched
    saved = load_file(tmp_path / "bf16" / "model.safetensors")
    assert "lm_head.weight" not in saved and {t.dtype for t in saved.values()} == {torch.bfloat16}
    for k, v in model.state_dict().items():
        if k in saved:
            assert torch.equal(saved[k], v.to(torch.bfloat16)), k
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert torch.equal(back.lm_head.weight, model.model.embed_tokens.weight.to(torch.bfloat16))


def test_bf16_sft_saves_bf16_and_save_fp32_keeps_float32(tiny_model_dir, tmp_path):
    def run(name, **kw):
        cfg = _cfg(tiny_model_dir, tmp_path / name, max_steps=2, save_every=1, **kw)
        cfg = replace(cfg, model=ModelArgs(path=str(tiny_model_dir), dtype="bfloat16"))
        sft.train(cfg)
        return tmp_path / name

    bf16 = run("bf16")
    assert dtypes(bf16 / "final") == dtypes(bf16 / "checkpoints" / "step-1") == {torch.bfloat16}
    assert json.loads((bf16 / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    # float32 master weights under bf16 autocast (on CPU too, issue 14 item 4): the bf16 folder is lossy,
    # so the resumable state keeps the master weights
    assert {t.dtype for t in state(bf16 / "checkpoints" / "step-1")["model"].values()} == {torch.float32}
    fp32 = run("fp32", save_fp32=True)
    a, b = load_file(bf16 / "final" / "model.safetensors"), load_file(fp32 / "final" / "model.safetensors")
    assert dtypes(fp32 / "final") == {torch.float32}
    assert all(torch.equal(b[k].to(torch.bfloat16), a[k]) for k in a)  # the same training, saved wide


def test_an_old_state_only_checkpoint_is_not_taken_for_a_model(tmp_path, capsys):
    old = tmp_path / "step-27"
    old.mkdir()
    (old / "state.pt").write_bytes(b"")
    assert cli.main(["generate", "--model", str(old), "--post", "hello"]) == 2
    assert capsys.readouterr().err == (
        f"tldr-rlhf: error: {old} holds only resumable training state (state.pt, written by an older tldr-rlhf), no loadable "
        "model; load the run's final/, or a checkpoint written since checkpoints hold a Hugging Face folder\n"
    )


def test_ppo_checkpoint_is_the_policy(qwen_tokenizer, tmp_path):
    """PPO's checkpoint folder is the policy (what final/ holds), with the value
    model's tensors (not in the folder) kept in state.pt."""
    from test_ppo import small_cfg
    from rl_fixtures import make_checkpoints, one_thread

    from tldr_rlhf.train import ppo

    sft_path, rm_path = make_checkpoints(qwen_tokenizer)
    with one_thread():
        ppo.train(small_cfg(sft_path, rm_path, tmp_path / "ppo"))
    step1 = tmp_path / "ppo" / "checkpoints" / "step-1"
    s = state(step1)
    assert {k.split(".")[0] for k in s["model"]} == {"value"}
    assert all(k.startswith("policy.") for k in s["model_from_weights"])
    assert json.loads((step1 / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]


def test_reward_model_checkpoint_loads_as_a_reward_model(tiny_model_dir, tmp_path):
    from test_reward_model import _cfg as rm_cfg

    from tldr_rlhf.reward.loading import load_frozen_reward_model
    from tldr_rlhf.checkpoints import checkpoint_kind
    from tldr_rlhf.train import rm

    out = tmp_path / "rm"
    rm.train(rm_cfg(str(tiny_model_dir), out, max_steps=3))
    step2 = out / "checkpoints" / "step-2"
    assert checkpoint_kind(str(step2)) == "reward_model" and (step2 / "reward_model.py").is_file()
    s = state(step2)
    assert s["model"] == {} and "score.weight" in s["model_from_weights"]
    model = load_frozen_reward_model(str(step2))
    with safe_open(step2 / "model.safetensors", "pt") as f:
        assert torch.equal(model.score.weight, f.get_tensor("score.weight"))
