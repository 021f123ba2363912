"""The front door: --version, --help on stdout, a short pipeline --help."""

from __future__ import annotations

import re
from importlib import metadata

import pytest

from tldr_rlhf import cli


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_prints_package_torch_and_transformers(flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse([flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out == f"tldr-rlhf {metadata.version('tldr-rlhf')}\ntorch {metadata.version('torch')}\ntransformers {metadata.version('transformers')}\n"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_goes_to_stdout(flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse([flag])
    captured = capsys.readouterr()
    assert e.value.code == 0 and captured.err == ""
    assert captured.out.startswith("usage: tldr-rlhf COMMAND [--preset NAME] [--config FILE] [flags]")
    assert re.search(r"\n  pipeline +SFT -> RM", captured.out)  # the column is as wide as the longest command


def test_unknown_command_and_no_command_go_to_stderr_exit_2(capsys):
    for argv in (["nope"], []):
        with pytest.raises(SystemExit) as e:
            cli.parse(argv)
        captured = capsys.readouterr()
        assert e.value.code == 2 and captured.out == "" and "usage: tldr-rlhf COMMAND" in captured.err
    assert captured.err.startswith("usage:")  # no command: just the usage


def test_pipeline_help_is_short_and_names_every_stage_prefix(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["pipeline", "--preset", "cpu-smol", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    lines = out.splitlines()
    assert len(lines) < 60, len(lines)
    assert "--run-dir STR" in out and "--table-posts INT" in out and "(default: runs/pipeline-cpu-smol)" in out
    assert "--sft.optim.lr FLOAT" not in out and "sft options" not in out  # the stage sections are not expanded
    for stage in ("sft", "rm", "evaluate-rm", "dpo", "ppo", "grpo", "rloo", "evaluate"):
        assert any(line.startswith(f"  --{stage}.FIELD ...") and line.endswith(f"(tldr-rlhf {stage} --help lists them)") for line in lines), stage
    with pytest.raises(SystemExit):
        cli.parse(["pipeline", "--help-all"])
    full = capsys.readouterr().out
    assert "--sft.optim.lr FLOAT" in full and "--ppo.run.max-steps INT" in full and len(full.splitlines()) > 1000


def test_pipeline_stage_flags_still_work():
    _, cfg = cli.parse(["pipeline", "--preset", "cpu-smol", "--ppo.run.max-steps", "5", "--sft.optim.lr", "0.5"])
    assert cfg.ppo.run.max_steps == 5 and cfg.sft.optim.lr == 0.5
