"""Issue 27, item 7: one spelling across commands for the reward-model path (--rm-path), the response
length cap (--response-length) and torch threads (--num-threads); an old spelling still works and
prints one deprecation line."""

from __future__ import annotations

import dataclasses

import pytest

from tldr_rlhf import cli
from tldr_rlhf.stages import COMMANDS

# the value each command needs besides the flag under test (a required field)
REQUIRED = {"generate": ["--model", "m"]}


def _threads(cfg) -> int:
    run = getattr(cfg, "run", None)
    return run.num_threads if dataclasses.is_dataclass(run) else cfg.num_threads


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "ppo", "grpo", "rloo", "online-dpo", "evaluate", "evaluate-rm", "inspect", "generate", "gold", "pipeline"])
def test_num_threads_is_one_flag_in_every_command_that_runs_torch(command, capsys):
    _, cfg = cli.parse([command, *REQUIRED.get(command, []), "--num-threads", "3"])
    assert _threads(cfg) == 3
    assert capsys.readouterr().err == ""  # not deprecated anywhere
    if command in ("sft", "ppo"):  # the run section's full path is the same field
        assert _threads(cli.parse([command, "--run.num-threads", "2"])[1]) == 2


@pytest.mark.parametrize(("command", "field"), [
    ("ppo", "rm_path"), ("grpo", "rm_path"), ("rloo", "rm_path"), ("online-dpo", "rm_path"), ("evaluate", "rm_path"),
    ("inspect", "rm_path"), ("evaluate-rm", "model"),
])
def test_rm_path_is_the_reward_model_flag_of_every_command(command, field, capsys):
    _, cfg = cli.parse([command, "--rm-path", "runs/rm-x/final"])
    assert getattr(cfg, field) == "runs/rm-x/final"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", ["ppo", "grpo", "rloo", "online-dpo", "evaluate", "inspect", "generate"])
def test_response_length_is_the_length_cap_of_every_command(command, capsys):
    _, cfg = cli.parse([command, *REQUIRED.get(command, []), "--response-length", "17"])
    assert cfg.response_length == 17
    assert capsys.readouterr().err == ""


def test_dpo_sample_cap_is_spelled_like_the_others(capsys):
    assert cli.parse(["dpo", "--sample-response-length", "17"])[1].sample_max_new_tokens == 17
    assert capsys.readouterr().err == ""
    assert cli.main(["dpo", "--sample-response-length", "0"]) == 2
    assert capsys.readouterr().err.startswith("tldr-rlhf: error: --sample-response-length 0: must be > 0")


@pytest.mark.parametrize(("argv", "old", "new", "read"), [
    (["evaluate-rm", "--model", "runs/rm-x/final"], "--model", "--rm-path", lambda c: c.model),
    (["evaluate-rm", "--model=runs/rm-x/final"], "--model", "--rm-path", lambda c: c.model),
    (["pipeline", "--evaluate-rm.model", "runs/rm-x/final"], "--evaluate-rm.model", "--evaluate-rm.rm-path", lambda c: c.evaluate_rm.model),
    (["generate", "--model", "m", "--max-new-tokens", "17"], "--max-new-tokens", "--response-length", lambda c: c.response_length),
    (["dpo", "--sample-max-new-tokens", "17"], "--sample-max-new-tokens", "--sample-response-length", lambda c: c.sample_max_new_tokens),
    (["pipeline", "--dpo.sample-max-new-tokens=17"], "--dpo.sample-max-new-tokens", "--dpo.sample-response-length", lambda c: c.dpo.sample_max_new_tokens),
])
def test_old_spellings_still_work_with_one_deprecation_line(argv, old, new, read, capsys):
    _, cfg = cli.parse(argv)
    assert read(cfg) in ("runs/rm-x/final", 17)
    command = argv[0]
    assert capsys.readouterr().err == f"tldr-rlhf {command}: {old} is deprecated, use {new} (the same flag in every command)\n"


def test_help_shows_the_one_spelling(capsys):
    with pytest.raises(SystemExit):
        cli.parse(["evaluate-rm", "--help"])
    text = capsys.readouterr().out
    assert "--rm-path STR" in text and "--model STR" not in text
    with pytest.raises(SystemExit):
        cli.parse(["generate", "--help"])
    text = capsys.readouterr().out
    assert "--response-length INT" in text and "--max-new-tokens INT" not in text


def test_a_bad_evaluate_rm_path_names_the_flag_the_user_typed(tmp_path, capsys):
    assert cli.main(["evaluate-rm", "--rm-path", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"tldr-rlhf: error: --rm-path {tmp_path / 'nope'}: model path does not exist\n"


def test_every_command_is_covered():
    """A new command that takes a reward model, a length cap or threads joins the tests above."""
    assert set(COMMANDS) >= {"sft", "rm", "dpo", "ppo", "grpo", "rloo", "online-dpo", "evaluate", "evaluate-rm", "inspect", "generate", "gold", "pipeline"}
