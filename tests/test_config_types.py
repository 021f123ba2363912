"""Issue 27, item 3: a value from ``--config`` passes the same type and range checks as its flag, and
a wrong one is one line naming the file and the field, before anything touches the disk."""

from __future__ import annotations

import pytest

from tldr_rlhf import cli


@pytest.mark.parametrize(("text", "message"), [
    ("micro_batch_size: two\n", "micro_batch_size: expected an integer, got 'two'"),
    ("run:\n  max_steps: 1.5\n", "run.max_steps: expected an integer, got 1.5"),
    ("run:\n  overwrite: maybe\n", "run.overwrite: expected true or false, got 'maybe'"),
    ("run:\n  output_dir: 7\n", "run.output_dir: expected a string, got 7"),
    ("optim:\n  betas: [0.9, fast]\n", "optim.betas[1]: expected a number, got 'fast'"),
    ("run:\n  report_to: [wandb, tensorbored]\n", "run.report_to[1]: expected 'none', 'tensorboard', 'wandb', 'trackio' or 'mlflow', got 'tensorbored'"),
    ("model:\n  dtype: fp8\n", "model.dtype: expected 'auto', 'float32' or 'bfloat16', got 'fp8'"),
    # the flag's range rule (validation.RULES), named by the file's key
    ("optim:\n  lr: -1.7\n", "optim.lr -1.7: must be > 0"),
    ("run:\n  max_steps: -3\n", "run.max_steps -3: must be >= 0"),
])
def test_a_wrong_value_in_a_file_is_one_line_and_nothing_is_created(tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "recipe.yaml"
    f.write_text(text)
    out = tmp_path / "runs" / "sft"
    assert cli.main(["sft", "--config", str(f), "--run.output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"tldr-rlhf: error: --config {f}: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # no run folder, nothing else


def test_a_run_config_json_with_a_wrong_type_in_a_nested_stage(tmp_path, capsys):
    f = tmp_path / "config.json"
    f.write_text('{"ppo": {"run": {"max_steps": "5x"}}}')
    assert cli.main(["pipeline", "--config", str(f)]) == 2
    assert capsys.readouterr().err == f"tldr-rlhf: error: --config {f}: ppo.run.max_steps: expected an integer, got '5x'\n"


def test_right_values_keep_their_types(tmp_path):
    # YAML's own spellings still work: 1e-4 (a string to PyYAML) for a float, an int for a float, a list for a tuple
    f = tmp_path / "ok.yaml"
    f.write_text("optim:\n  lr: 1e-4\n  max_grad_norm: 2\n  betas: [0.8, 0.9]\nrun:\n  report_to: [tensorboard]\n  max_steps: 3\n")
    _, cfg = cli.parse(["sft", "--config", str(f)])
    assert (cfg.optim.lr, cfg.optim.max_grad_norm, cfg.optim.betas, cfg.run.report_to, cfg.run.max_steps) == (1e-4, 2.0, (0.8, 0.9), ("tensorboard",), 3)
    assert type(cfg.optim.lr) is float and type(cfg.optim.max_grad_norm) is float and type(cfg.run.max_steps) is int
