"""FSDP gradient clipping by the global norm (issue 27): with ``max_grad_norm`` far below the gradient
norm, 2 FSDP processes (gloo, CPU) clip to the same gradients as 1 process. A clip by each process's
local shard norm would scale each shard by its own factor (total norm about sqrt(2) x the limit here);
the earlier FSDP tests never reached their limit, so such a bug passed them."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import free_port

SCRIPT = Path(__file__).with_name("dist_clip_script.py")
MAX_NORM = 1e-3


def _run(out: Path, processes: int) -> dict:
    args = [str(SCRIPT), str(out), str(MAX_NORM)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


def test_fsdp_clips_by_the_global_norm_two_processes_equal_one(tmp_path):
    one, two = _run(tmp_path / "one.pt", 1), _run(tmp_path / "two.pt", 2)
    assert one["norm"] > 100 * MAX_NORM  # far above the limit: clipping scales every gradient down
    assert abs(two["norm"] - one["norm"]) <= 1e-5 * one["norm"]  # the norm before clipping: the global one
    assert sorted(one["grads"]) == sorted(two["grads"])
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in two["grads"].values()]))
    assert abs(clipped.item() - MAX_NORM) < 1e-5 * MAX_NORM  # clipped to the limit
    for n, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][n], g, rtol=1e-4, atol=1e-9)  # clipped values up to about 1e-4
