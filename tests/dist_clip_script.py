"""Run by test_fsdp_clipping.py, under torchrun (2 processes, FSDP2 over gloo) or plain python (1
process, no sharding): one backward of the tiny Qwen2's summed response log-likelihood on 4 fixed
rows (each process its share), then ``loop.optimizer_step`` with gradient clipping at MAX_NORM; process
0 writes the gradient norm it returned and the full clipped gradients the optimizer saw to OUT.
Usage: OUT MAX_NORM."""

import os
import sys
from types import SimpleNamespace

import torch

from conftest import make_tiny_qwen2
from tldr_rlhf.train import fsdp
from tldr_rlhf.train.loop import optimizer_step

# 4 rows of 7 real token ids (Qwen2.5 vocabulary)
ROWS = torch.tensor([
    [9707, 11, 1879, 40, 1075, 311, 1349],
    [785, 3974, 13876, 6, 7, 40, 1075],
    [311, 40, 1075, 1349, 13, 9707, 11],
    [13876, 11, 9707, 785, 3974, 6, 7],
])


class RecordingOptimizer:
    """Stands in for the optimizer: ``step`` keeps the full (unsharded) gradient of every parameter."""

    def __init__(self, model):
        self.model, self.grads = model, {}

    def step(self):
        for n, p in self.model.named_parameters():
            g = p.grad
            self.grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


if __name__ == "__main__":
    out, max_norm = sys.argv[1], float(sys.argv[2])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    model = make_tiny_qwen2(hidden=16)
    if world > 1:
        torch.distributed.init_process_group("gloo")  # as accelerate does under torchrun
        model = fsdp.shard_model(model, torch.device("cpu"))
    rank = fsdp.rank()
    mine = ROWS[rank * len(ROWS) // world : (rank + 1) * len(ROWS) // world]
    logits = model(input_ids=mine).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, mine[:, 1:, None])[..., 0]
    (-lp.sum(-1).mean()).backward()  # the mean over this process's rows; FSDP averages the processes' gradients
    opt = RecordingOptimizer(model)
    norm = optimizer_step(model, opt, None, SimpleNamespace(clip_grad_norm_=torch.nn.utils.clip_grad_norm_), max_norm)
    if rank == 0:
        torch.save({"norm": norm, "grads": opt.grads}, out)
    fsdp.barrier()
