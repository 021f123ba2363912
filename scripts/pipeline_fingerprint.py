"""Every number a tiny pipeline run produces, as one JSON file: for checking that a refactor changes
no behaviour (run before and after, then diff the two files).

    python scripts/pipeline_fingerprint.py OUT.json [--keep RUN_DIR]

It runs tests/test_pipeline.py's tiny pipeline (tiny Qwen2 models built from a config, the real
Qwen2.5 tokenizer, real posts and comparisons; sft, rm, evaluate-rm, dpo, ppo, grpo, rloo, evaluate)
on one thread and records every stage's metrics.jsonl and samples.jsonl, eval_rm.json, eval.json,
summaries.jsonl and a SHA-256 of every final/ weight file. Wall-clock fields (perf/*, seconds,
timestamps, evaluate's per-policy cache keys with file mtimes) and the temporary folders' paths (the run
folder, the tiny models) are left out or replaced, since they differ between any two runs.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

VOLATILE = ("perf/", "seconds", "started", "finished", "time", "peak_memory")
VOLATILE_KEYS = {"key"}  # evaluate/policies/NAME.jsonl: the reuse key holds checkpoint files' mtimes


def _clean(obj, paths: dict[str, str]):
    if isinstance(obj, dict):
        return {k: _clean(v, paths) for k, v in obj.items() if k not in VOLATILE_KEYS and not any(k.startswith(p) or k.endswith(p) for p in VOLATILE)}
    if isinstance(obj, list):
        return [_clean(v, paths) for v in obj]
    if isinstance(obj, str):
        for path, name in paths.items():
            obj = obj.replace(path, name)
        return obj
    return obj


def fingerprint(run_dir: Path, models_dir: str = "") -> dict:
    """The numbers of a finished pipeline run folder; ``models_dir`` (the tiny models' temporary
    folder) is written as MODELS."""
    paths = {str(run_dir): "RUN", **({models_dir: "MODELS"} if models_dir else {})}
    out: dict = {}
    for f in sorted(run_dir.rglob("*")):
        rel = str(f.relative_to(run_dir))
        if f.suffix == ".jsonl" and "checkpoints" not in rel:
            out[rel] = [_clean(json.loads(line), paths) for line in f.read_text().splitlines() if line.strip()]
        elif f.name in ("eval.json", "eval_rm.json", "config.json") and "final" not in rel and "checkpoints" not in rel:
            out[rel] = _clean(json.loads(f.read_text()), paths)
        elif f.suffix == ".safetensors" and "/final/" in f"/{rel}":
            out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def main() -> None:
    import dataclasses

    import torch

    from conftest import QWEN_TOKENIZER  # noqa: F401  (the tests' shared paths)
    from rl_fixtures import make_checkpoints
    from test_pipeline import tiny_pipeline

    from tldr_rlhf.config import RLOOConfig
    from tldr_rlhf.modeling import load_tokenizer
    from tldr_rlhf.pipeline import run_pipeline

    torch.set_num_threads(1)
    target = Path(sys.argv[1])
    keep = sys.argv[sys.argv.index("--keep") + 1] if "--keep" in sys.argv else None
    run_dir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="pipeline-fp-")) / "run"
    base, _ = make_checkpoints(load_tokenizer(str(QWEN_TOKENIZER)))
    cfg = tiny_pipeline(base, run_dir, stages=("sft", "rm", "evaluate-rm", "dpo", "ppo", "grpo", "rloo", "evaluate"))
    g = cfg.grpo  # RLOO at GRPO's tiny sizes
    rloo = RLOOConfig(
        dtype="float32", data=g.data, optim=g.optim, run=g.run, total_episodes=4, rollout_prompts=2, group_size=2, mini_batch_size=4,
        micro_batch_size=4, forward_batch_size=4, update_per_rollout=1, response_length=6, num_sample_posts=1,
    )
    cfg = dataclasses.replace(cfg, rloo=rloo)
    run_pipeline(cfg)
    numbers = fingerprint(run_dir, str(Path(base).parent))
    target.write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")
    print(f"{target}: {len(numbers)} files fingerprinted from {run_dir}")


if __name__ == "__main__":
    main()
