"""Run by test_sft.py under torchrun: a tiny SFT run with micro-batch 1 and the given accumulation."""

import sys

from tldr_rlhf.config import ModelArgs, OptimArgs, RunArgs, SFTConfig, TldrDataArgs
from tldr_rlhf.train import sft

model_dir, posts, out, accum = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sft.train(
    SFTConfig(
        model=ModelArgs(path=model_dir),
        data=TldrDataArgs(train=posts, max_query_length=96, limit=12, valid_limit=4, valid_fraction=0.01),
        optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=1, decay_steps=0),
        run=RunArgs(output_dir=out, progress=False, eval_every=0, save_every=0, max_steps=3),
        micro_batch_size=1,
        gradient_accumulation_steps=accum,
        num_sample_posts=0,
    )
)
