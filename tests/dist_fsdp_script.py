"""Run by test_fsdp.py under torchrun: every training stage through the CLI (``tldr_rlhf.cli.main``,
the argv ``torchrun -m tldr_rlhf.cli STAGE ...`` would pass), tiny and in one process group, with
``--run.fsdp`` or without it (data-parallel), each stage in OUT_ROOT/STAGE; a stage an earlier
attempt finished is skipped, one it left unfinished resumes. Usage: SFT_DIR RM_DIR OUT_ROOT fsdp|ddp STAGE..."""

import os
import sys
from pathlib import Path

from conftest import COMPARISONS, POSTS, QWEN_TOKENIZER
from tldr_rlhf import cli


def stage_argv(stage: str, sft: str, rm: str, out: str, world: int) -> list[str]:
    """The stage's tiny argv. Global batch sizes do not depend on ``world`` (SFT / RM / DPO set the
    per-process accumulation so that micro-batch x accumulation x world stays 4)."""
    accum = str(4 // world)
    run = ["--run.output-dir", out, "--run.no-progress", "--run.save-every", "1", "--run.eval-every", "0"]
    posts = ["--data.train", str(POSTS), "--data.max-query-length", "64"]
    rl = ["--sft-path", sft, "--rm-path", rm, "--dtype", "float32", *posts, "--data.limit", "16", "--data.valid-fraction", "0.1", "--response-length", "6", "--num-sample-posts", "0", "--optim.lr", "1e-3"]
    return {
        "sft": ["sft", "--model.path", sft, *posts, "--data.limit", "16", "--data.valid-limit", "4", "--data.valid-fraction", "0.01", "--micro-batch-size", "1", "--gradient-accumulation-steps", accum, "--run.max-steps", "3", "--num-sample-posts", "1", "--optim.lr", "1e-3"],
        "rm": ["rm", "--model.path", sft, "--model.tokenizer", str(QWEN_TOKENIZER), "--data.comparisons", str(COMPARISONS), "--data.max-query-length", "48", "--data.limit", "24", "--data.valid-limit", "6", "--norm.posts", str(POSTS), "--norm.limit", "5", "--micro-batch-size", "1", "--gradient-accumulation-steps", accum, "--eval-batch-size", "4", "--run.max-steps", "3", "--optim.lr", "1e-3"],
        "dpo": ["dpo", "--sft-path", sft, "--dtype", "float32", "--data.comparisons", str(COMPARISONS), "--data.max-query-length", "96", "--data.max-response-length", "40", "--data.limit", "40", "--data.valid-limit", "6", "--micro-batch-size", "1", "--gradient-accumulation-steps", accum, "--eval-batch-size", "4", "--num-sample-posts", "1", "--run.max-steps", "3", "--optim.lr", "1e-3"],
        "ppo": ["ppo", *rl, "--total-episodes", "16", "--rollout-batch-size", "8", "--num-mini-batches", "2", "--micro-batch-size", "2", "--forward-batch-size", "4", "--ppo-epochs", "2"],
        "grpo": ["grpo", *rl, "--total-episodes", "16", "--rollout-prompts", "2", "--group-size", "4", "--mini-batch-size", "4", "--micro-batch-size", "2", "--update-per-rollout", "1"],
        "rloo": ["rloo", *rl, "--total-episodes", "16", "--rollout-prompts", "2", "--group-size", "4", "--mini-batch-size", "4", "--micro-batch-size", "2", "--update-per-rollout", "1"],
        "online-dpo": ["online-dpo", *rl, "--total-episodes", "16", "--rollout-prompts", "4", "--mini-batch-size", "4", "--micro-batch-size", "2", "--update-per-rollout", "1"],
    }[stage] + run


def _patch_for_tests() -> None:
    """Test hooks, set by environment variables:
    - ``FSDP_TEST_NO_EOS_PENALTY=1``: the RL stages run with ``--no-eos-penalty None`` (added to their
      argv below), so scores keep their value without EOS (tiny random policies never sample EOS, so
      the no-EOS penalty would make every score -1 and every advantage 0);
    - ``FSDP_TEST_DESYNC_RNG=1``: at a fresh start of an RL stage process R draws R random numbers, so
      that the processes' RNG states differ (with equal seeds and no EOS they would stay equal, and
      a resume that gave every process process 0's RNG state would pass unnoticed);
    - ``FSDP_TEST_EXIT_AFTER_CHECKPOINT=STAGE:N``: every process dies (``os._exit``, no clean-up, as
      under a kill) right after STAGE's step-N checkpoint is complete;
    - ``FSDP_TEST_STATE_BYTES=FILE``: each process writes ``fsdp.trained_state_bytes`` of the last
      stage's model and optimizer to ``FILE.RANK.json`` when the stage ends."""
    import json

    from tldr_rlhf.train import common, dpo, fsdp, loop, ppo, rl_common, rm, sft

    if os.environ.get("FSDP_TEST_DESYNC_RNG"):
        import torch

        real_start = rl_common.start_updates

        def start_then_desync(rl, *a, **k):
            out = real_start(rl, *a, **k)
            if out[0] == 0:  # a fresh start: process R draws R numbers, so the processes sample from different RNG states
                torch.rand(fsdp.rank())
            return out

        for module in (rl_common, ppo):  # GRPO, RLOO and online DPO call it through rl_common.start_policy_updates
            module.start_updates = start_then_desync
    exit_stage, _, exit_step = os.environ.get("FSDP_TEST_EXIT_AFTER_CHECKPOINT", "").partition(":")
    if exit_stage:
        real_save = loop.save_checkpoint

        def save_then_die(run, step, *a, **k):
            out = real_save(run, step, *a, **k)
            if run.stage == exit_stage and step == int(exit_step):
                fsdp.barrier()
                os._exit(3)
            return out

        loop.save_checkpoint = save_then_die
    state_file = os.environ.get("FSDP_TEST_STATE_BYTES")
    if state_file:
        real_prepare = common.prepare

        def prepare_and_remember(accelerator, model, optimizer):
            model, optimizer = real_prepare(accelerator, model, optimizer)
            PREPARED[:] = [model, optimizer]
            return model, optimizer

        for module in (sft, rm, dpo, rl_common):
            module.prepare = prepare_and_remember
        import atexit

        def write():
            model, optimizer = PREPARED
            Path(f"{state_file}.{fsdp.rank()}.json").write_text(json.dumps(fsdp.trained_state_bytes(model, optimizer)))

        atexit.register(write)


PREPARED: list = []


if __name__ == "__main__":
    _patch_for_tests()
    sft, rm, root, mode, *stages = sys.argv[1:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for stage in stages:
        if Path(f"{root}/{stage}/final/COMPLETE.json").exists():  # finished by an earlier attempt
            continue
        argv = stage_argv(stage, sft, rm, f"{root}/{stage}", world) + (["--run.fsdp"] if mode == "fsdp" else [])
        if os.environ.get("FSDP_TEST_NO_EOS_PENALTY") and stage in ("ppo", "grpo", "rloo", "online-dpo"):
            argv += ["--no-eos-penalty", "None"]
        code = cli.main(argv)
        if code:
            sys.exit(f"{stage}: exit code {code}")
