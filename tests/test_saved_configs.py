"""A config.json written by an earlier version keeps loading: ``from_dict`` rebuilds the same config.

The fixtures under tests/data/configs/ are ``save_config`` output of today's presets (``<stage>.<preset>.json``),
written in a checkout next to /work/shared: their absolute paths under that folder are rebased onto this
checkout's shared folder before comparing. A run's config.json and the pipeline's pipeline_config.json are
written the same way, and ``evaluate-rm --from-run`` reads a reward-model run's config.json back with
``from_dict`` (train/rm.py), so a schema change that breaks these fixtures breaks those reads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tldr_rlhf.config import (
    DPOConfig, EvaluateConfig, EvaluateRMConfig, GRPOConfig, PipelineConfig, PPOConfig, ReportConfig, RLOOConfig, RMConfig,
    SFTConfig, from_dict, to_dict,
)
from tldr_rlhf import presets as P

from conftest import SHARED

FIXTURES = Path(__file__).parent / "data" / "configs"
WRITTEN_NEXT_TO = "/work/shared"  # the shared folder of the checkout the fixtures were written in
STAGES = {
    "sft": (SFTConfig, P.SFT_PRESETS), "rm": (RMConfig, P.RM_PRESETS), "evaluate-rm": (EvaluateRMConfig, P.EVALUATE_RM_PRESETS),
    "dpo": (DPOConfig, P.DPO_PRESETS), "ppo": (PPOConfig, P.PPO_PRESETS), "grpo": (GRPOConfig, P.GRPO_PRESETS),
    "rloo": (RLOOConfig, P.RLOO_PRESETS), "evaluate": (EvaluateConfig, P.EVALUATE_PRESETS), "pipeline": (PipelineConfig, P.PIPELINE_PRESETS),
}


def _saved(path: Path) -> dict:
    return json.loads(path.read_text().replace(WRITTEN_NEXT_TO, str(SHARED)))


def _only(d, like):
    """``d`` restricted, at every level, to the keys of ``like``."""
    if isinstance(d, dict) and isinstance(like, dict):
        return {k: _only(d[k], like[k]) for k in d if k in like}
    return d


def _assert_rebuilt(cfg, where: str = "") -> None:
    """Every nested section is its dataclass again (not a dict) and every list field a tuple."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        assert not isinstance(value, (dict, list)), f"{where}{f.name} stayed a {type(value).__name__}"
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            assert type(value) is type(f.default_factory()), f"{where}{f.name}"
            _assert_rebuilt(value, f"{where}{f.name}.")


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.*.json")), ids=lambda p: p.stem)
def test_saved_stage_config_loads_to_the_same_config(path):
    stage, preset = path.stem.split(".", 1)
    cls, presets = STAGES[stage]
    saved = _saved(path)
    cfg = from_dict(cls, saved)
    assert type(cfg) is cls
    _assert_rebuilt(cfg)
    # every saved value back in the same field (fields added since the fixture was written take their
    # defaults: the comparison with the preset below checks them)
    assert _only(json.loads(json.dumps(to_dict(cfg))), saved) == saved
    assert cfg == presets[preset]  # and the config it was saved from


def test_saved_report_config_loads():
    saved = json.loads((FIXTURES / "report.json").read_text())
    assert from_dict(ReportConfig, saved) == ReportConfig(run_dir="runs/pipeline-cpu-smol", table_posts=2)


def test_every_stage_has_a_fixture():
    assert {p.stem.split(".", 1)[0] for p in FIXTURES.glob("*.*.json")} == set(STAGES)
