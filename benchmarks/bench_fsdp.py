"""Per-process memory of FSDP2 (``--run.fsdp``, issue 14 item 1) against one process without it, on the
real SmolLM2-135M (``sft --preset cpu-smol``: real TL;DR posts, queries up to 256 tokens), CPU and gloo.

For each setup one ``tldr-rlhf sft`` run of ``--steps`` optimizer steps (global batch 4: micro-batch 1,
accumulation 4 / processes) runs under torchrun; when it ends each process reports
- the bytes of trainable parameters and AdamW moments it holds (``fsdp.trained_state_bytes``: its
  shards under FSDP), what FSDP divides by the number of processes;
- its peak resident set (VmHWM). On CPU this includes loading the full model before it is sharded,
  the full weights gathered for ``final/`` on process 0, the frozen tokenizer and the Python heap,
  so it shrinks by less than the trained state does; on a GPU the loaded weights stay in host memory
  and the device holds only the shards.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_fsdp.py            # 1 process vs 2 FSDP processes
    ... --steps 2 --out /tmp/bench-fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(out: Path, steps: int, fsdp: bool) -> None:
    """One process of the measured run: the SFT stage through the CLI, then this process's numbers to
    ``out/rank-R.json``."""
    from tldr_rlhf import cli
    from tldr_rlhf.train import common, fsdp as fsdp_mod, sft

    prepared: list = []
    real_prepare = common.prepare

    def remember(accelerator, model, optimizer):
        model, optimizer = real_prepare(accelerator, model, optimizer)
        prepared[:] = [model, optimizer]
        return model, optimizer

    sft.prepare = remember
    world = int(os.environ.get("WORLD_SIZE", "1"))
    argv = [
        "sft", "--preset", "cpu-smol", "--micro-batch-size", "1", "--gradient-accumulation-steps", str(4 // world),
        "--run.max-steps", str(steps), "--run.eval-every", "0", "--run.save-every", "0", "--num-sample-posts", "0",
        "--data.valid-limit", "4", "--run.output-dir", str(out / "run"), "--run.overwrite", "--run.no-progress",
    ] + (["--run.fsdp"] if fsdp else [])
    t0 = time.perf_counter()
    code = cli.main(argv)
    elapsed = time.perf_counter() - t0
    model, optimizer = prepared
    sizes = fsdp_mod.trained_state_bytes(model, optimizer)
    (out / f"rank-{fsdp_mod.rank()}.json").write_text(json.dumps({**sizes, "peak_rss_mib": _hwm_mib(), "seconds": elapsed, "exit": code}))


def launch(out: Path, processes: int, steps: int, fsdp: bool) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    args = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--steps", str(steps)] + (["--fsdp"] if fsdp else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(29400 + processes), *args] if processes > 1 else [sys.executable, *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(processes)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-fsdp"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.out, a.steps, a.fsdp)
        return
    mib = 2**20
    rows = []
    for name, processes, fsdp in (("1 process", 1, False), ("2 processes, FSDP", 2, True)):
        for rank, r in enumerate(launch(a.out / name.replace(" ", "").replace(",", "-"), processes, a.steps, fsdp)):
            rows.append([name, str(rank), f"{r['parameters'] / mib:.1f}", f"{r['optimizer'] / mib:.1f}", f"{(r['parameters'] + r['optimizer']) / mib:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['seconds']:.0f}"])
    header = ["setup", "process", "trained weights MiB", "AdamW moments MiB", "together MiB", "peak RSS MiB", "run s"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
