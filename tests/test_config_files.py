"""--config FILE (a YAML recipe or a run's config.json) on every command, and the recipes/ folder."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
from conftest import POSTS

from tldr_rlhf import cli
from tldr_rlhf.config import SHARED, OptimArgs, RunArgs, SFTConfig, to_dict
from tldr_rlhf.errors import ConfigError
from tldr_rlhf.presets import PIPELINE_PRESETS, PPO_PRESETS, RM_PRESETS, SFT_PRESETS
from tldr_rlhf.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_partial_yaml_on_the_default_preset_then_flags(tmp_path):
    f = _write(tmp_path / "r.yaml", "optim:\n  lr: 1e-4\n  betas: [0.8, 0.9]\nrun:\n  max_steps: 7\nmicro_batch_size: 4\n")
    _, cfg = cli.parse(["sft", "--config", f, "--run.max-steps", "3"])
    seed = SFT_PRESETS["seed"]
    # the file's fields (PyYAML reads 1e-4 as a string: it becomes the float), then the flag, the rest the preset's
    assert cfg == dataclasses.replace(seed, optim=dataclasses.replace(seed.optim, lr=1e-4, betas=(0.8, 0.9)), run=dataclasses.replace(seed.run, max_steps=3), micro_batch_size=4)
    assert type(cfg.optim.lr) is float and cfg.optim.betas == (0.8, 0.9)


def test_preset_then_file_then_flags(tmp_path):
    f = _write(tmp_path / "r.yaml", "data:\n  valid_limit: 5\nrun:\n  output_dir: runs/mine\n")
    _, cfg = cli.parse(["rm", "--config", f, "--preset", "cpu-smol", "--run.output-dir", "runs/flag"])
    base = RM_PRESETS["cpu-smol"]
    assert cfg == dataclasses.replace(base, data=dataclasses.replace(base.data, valid_limit=5), run=dataclasses.replace(base.run, output_dir="runs/flag"))


def test_pipeline_file_sets_a_nested_stage_field(tmp_path):
    f = _write(tmp_path / "p.json", json.dumps({"run_dir": "runs/p", "ppo": {"run": {"max_steps": 5}}}))
    _, cfg = cli.parse(["pipeline", "--preset", "cpu-smol", "--config", f, "--sft.optim.lr", "0.25"])
    base = PIPELINE_PRESETS["cpu-smol"]
    assert cfg.run_dir == "runs/p" and cfg.ppo.run.max_steps == 5 and cfg.sft.optim.lr == 0.25
    assert cfg.ppo == dataclasses.replace(base.ppo, run=dataclasses.replace(base.ppo.run, max_steps=5))
    assert cfg.rm == base.rm


@pytest.mark.parametrize(("text", "message"), [
    ("optim:\n  lr: 1e-4\n  learning_rate: 2\n", "unknown key 'optim.learning_rate' (OptimArgs has no such field)"),
    ("epochz: 2\n", "unknown key 'epochz' (SFTConfig has no such field)"),
    ("optim: 3\n", "optim: expected a section (a mapping of its fields), got 3"),
    ("optim:\n  lr: fast\n", "optim.lr: expected a number, got 'fast'"),
    ("- 1\n- 2\n", "expected a mapping of field names, got list"),
    ("a: [1\n", "cannot parse (ParserError: while parsing a flow sequence)"),
])
def test_bad_files_are_one_line_naming_file_and_key(tmp_path, capsys, text, message):
    f = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        cli.parse(["sft", "--config", f])
    assert str(e.value) == f"--config {f}: {message}"
    assert cli.main(["sft", "--config", f]) == 2
    assert capsys.readouterr().err == f"tldr-rlhf: error: --config {f}: {message}\n"


def test_missing_file_and_required_fields(tmp_path):
    with pytest.raises(ConfigError, match=r"^--config .*nope.yaml: file not found$"):
        cli.parse(["sft", "--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match=r": missing required field\(s\) model$"):
        cli.parse(["generate", "--config", _write(tmp_path / "g.yaml", "limit: 2\n")])
    _, args = cli.parse(["generate", "--config", _write(tmp_path / "g2.yaml", "model: m\nlimit: 2\n"), "--post", "hi"])
    assert (args.model, args.limit, args.post) == ("m", 2, "hi")


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss/sft"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss/sft" in r]


def test_a_runs_config_json_reproduces_the_run(tiny_model_dir, tmp_path):
    from tldr_rlhf.config import ModelArgs, TldrDataArgs
    from tldr_rlhf.train import sft

    first = tmp_path / "x"
    cfg = SFTConfig(
        model=ModelArgs(path=str(tiny_model_dir)),
        data=TldrDataArgs(train=str(POSTS), max_query_length=96, limit=16, valid_limit=4, valid_fraction=0.01),
        optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=1, decay_steps=0),
        run=RunArgs(output_dir=str(first), progress=False, eval_every=0, save_every=0, max_steps=3, num_threads=1),
        micro_batch_size=2, gradient_accumulation_steps=2, num_sample_posts=1,
    )
    sft.train(cfg)
    second = tmp_path / "y"
    assert cli.main(["sft", "--config", str(first / "config.json"), "--run.output-dir", str(second)]) == 0
    a, b = _losses(first), _losses(second)
    assert [s for s, _ in a] == [1, 2, 3] and a == b  # exactly the same losses: same seed, same threads
    assert json.loads((second / "config.json").read_text()) == json.loads(json.dumps(to_dict(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(second))))))


def _write_recipes_module():
    spec = importlib.util.spec_from_file_location("write_recipes", ROOT / "scripts" / "write_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipes_folder_is_what_the_script_writes_from_presets():
    recipes = _write_recipes_module().recipes()
    expected = {str(rel) for rel in recipes}
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml")}
    assert on_disk == expected
    assert len(expected) == sum(len(s.preset_table()) for s in STAGES) == 42  # online-dpo: default, cpu-smol, cpu-smol-gold; gold: default, cpu-smol, cpu-learn; pipeline: cpu-gold, cpu-learn; reinforce-pp: default, cpu-smol
    for rel, text in recipes.items():
        assert (ROOT / rel).read_text() == text, f"{rel} is stale: run python scripts/write_recipes.py"


@pytest.mark.parametrize(("stage", "preset"), [(s.name, p) for s in STAGES for p in s.preset_table()])
def test_each_recipe_loads_to_exactly_its_preset(stage, preset):
    base = {s.name: s for s in STAGES}[stage].preset_table()
    other = next(p for p in base if p != preset) if len(base) > 1 else preset  # start from another preset: the file gives every field
    _, cfg = cli.parse([stage, "--preset", other, "--config", str(ROOT / "recipes" / stage / f"{preset}.yaml")])
    expected = json.loads(json.dumps(to_dict(base[preset])).replace(str(SHARED) + "/", "../shared/"))
    assert json.loads(json.dumps(to_dict(cfg))) == expected
    if str(SHARED) not in json.dumps(to_dict(base[preset])):
        assert cfg == base[preset]  # no machine-specific path: the very same config object


def test_cpu_smol_recipe_paths_are_relative_to_the_repo_root():
    _, cfg = cli.parse(["sft", "--config", str(ROOT / "recipes" / "sft" / "cpu-smol.yaml")])
    assert cfg.model.path == "../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (ROOT / cfg.model.path).resolve() == Path(SFT_PRESETS["cpu-smol"].model.path).resolve()
    _, cfg = cli.parse(["ppo", "--config", str(ROOT / "recipes" / "ppo" / "cpu-smol.yaml")])
    assert cfg.data.train == "../shared/data/tldr/posts/valid_sample.jsonl"
    assert (ROOT / cfg.data.train).resolve() == Path(PPO_PRESETS["cpu-smol"].data.train).resolve()


def test_several_config_files_apply_in_order(tmp_path):
    a = _write(tmp_path / "a.yaml", "optim:\n  lr: 0.5\n  min_lr: 0.05\n")
    b = _write(tmp_path / "b.yaml", "optim:\n  lr: 0.25\n")
    _, cfg = cli.parse(["sft", "--config", a, "--config", b])
    assert (cfg.optim.lr, cfg.optim.min_lr) == (0.25, 0.05)
