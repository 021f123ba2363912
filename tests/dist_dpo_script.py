"""A tiny DPO run with micro-batch 1 and the given accumulation; run by test_dpo.py under torchrun
(and imported by it for the one-process run with the same settings)."""

import sys

from tldr_rlhf.config import DPOConfig, PreferenceDataArgs as DPODataArgs, OptimArgs, RunArgs


def make_config(model_dir: str, comparisons: str, out: str, accum: int) -> DPOConfig:
    return DPOConfig(
        sft_path=model_dir,
        data=DPODataArgs(comparisons=comparisons, max_query_length=96, max_response_length=40, limit=40, valid_limit=5),
        optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=0),
        run=RunArgs(output_dir=out, progress=False, eval_every=0, save_every=0, max_steps=2, num_threads=1),
        micro_batch_size=1,
        gradient_accumulation_steps=accum,
        eval_batch_size=2,
        num_sample_posts=0,
    )


if __name__ == "__main__":
    from tldr_rlhf.train import dpo

    dpo.train(make_config(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
