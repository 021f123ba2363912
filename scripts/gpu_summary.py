"""Per-stage speed and memory of a pipeline run folder (what scripts/gpu_check.sh prints): median
tokens/s of the training steps, model FLOPs utilization ``6 N tokens/s / peak`` (N the trained model's
parameters; the RL stages' tokens/s include their rollouts, so their MFU is a lower bound) against the
GPU's dense bf16 peak, and the peak memory each stage recorded.

    python scripts/gpu_summary.py RUN_DIR [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# dense bf16 tensor-core peaks (TFLOP/s), by a word of the device name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "GB10": 209.0}


def device_peak() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    return name, next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: from its name)")
    args = ap.parse_args()
    from tldr_rlhf.evaluate import markdown_table
    from tldr_rlhf.memory import model_shape
    from tldr_rlhf.stages import TRAIN_STAGES

    name, peak = device_peak()
    peak = args.peak_tflops or peak
    rows = []
    for stage in TRAIN_STAGES:
        f = Path(args.run_dir) / stage / "metrics.jsonl"
        if not f.is_file():
            continue
        records = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        tps = [r["perf/tokens_per_s"] for r in records if isinstance(r.get("perf/tokens_per_s"), (int, float))]
        mem = [r["perf/peak_memory_mb"] for r in records if isinstance(r.get("perf/peak_memory_mb"), (int, float))]
        params = model_shape(str(Path(args.run_dir) / stage / "final")).params if (Path(args.run_dir) / stage / "final" / "config.json").is_file() else None
        tok_s = statistics.median(tps) if tps else None
        mfu = 6 * params * tok_s / (peak * 1e12) if tok_s and params and peak else None
        rows.append([stage, f"{params / 1e6:.0f}M" if params else "-", f"{tok_s:,.0f}" if tok_s else "-", f"{100 * mfu:.1f}%" if mfu is not None else "-", f"{max(mem):,.0f}" if mem else "-"])
    print(f"device: {name}; peak {peak or '?'} TFLOP/s bf16 dense")
    print(markdown_table(["stage", "params", "tokens/s (median)", "MFU", "peak memory MiB"], rows))


if __name__ == "__main__":
    main()
