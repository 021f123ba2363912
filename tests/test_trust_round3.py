"""No setting that runs code comes from a file unnoticed (issue 27, item 2):

* ``--run.trust-checkpoint`` is never written to config.json nor read from a ``--config`` file: the
  README's rerun ``--config runs/X/config.json`` of a run that was trusted once does not unpickle a
  ``state.pt`` planted since (its code does not run);
* a ``module:function`` reward named in a ``--config`` file is logged with the file;
* the LLM judge's API key is never sent over plain http to another machine (one line).
"""

import json
import logging
import shutil

import pytest
import torch

from tldr_rlhf import cli
from tldr_rlhf.config import RunArgs, SFTConfig, from_dict, to_dict
from tldr_rlhf.judge import ChatClient, JudgeError

from test_checkpoints import Evil, state
from test_fault_tolerance import run_cli, sft_args


def test_trust_checkpoint_is_not_in_a_saved_config_nor_read_back():
    cfg = SFTConfig(run=RunArgs(trust_checkpoint=True))
    saved = to_dict(cfg)
    assert "trust_checkpoint" not in saved["run"] and "seed" in saved["run"]
    old = json.loads(json.dumps(saved))
    old["run"]["trust_checkpoint"] = True  # the config.json of an older tldr-rlhf
    assert from_dict(SFTConfig, old).run.trust_checkpoint is False


def test_trust_checkpoint_in_a_config_file_is_ignored_with_a_warning(tmp_path, caplog):
    f = tmp_path / "recipe.yaml"
    f.write_text("run:\n  trust_checkpoint: true\n  seed: 7\n")
    with caplog.at_level(logging.WARNING):
        _, cfg = cli.parse(["sft", "--config", str(f)])
    assert cfg.run.trust_checkpoint is False and cfg.run.seed == 7
    assert f"--config {f}: run.trust_checkpoint ignored: it holds only for a command that passes --run.trust-checkpoint itself" in caplog.messages
    _, cfg = cli.parse(["sft", "--config", str(f), "--run.trust-checkpoint"])  # the flag of this invocation
    assert cfg.run.trust_checkpoint is True
    # a pipeline recipe's stage sections too
    p = tmp_path / "pipe.yaml"
    p.write_text("sft:\n  run:\n    trust_checkpoint: true\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, cfg = cli.parse(["pipeline", "--config", str(p)])
    assert cfg.sft.run.trust_checkpoint is False
    assert any("sft.run.trust_checkpoint ignored" in m and "--sft.run.trust-checkpoint" in m for m in caplog.messages)


def test_a_python_reward_named_in_a_config_file_is_logged_with_the_file(tmp_path, caplog):
    f = tmp_path / "grpo.yaml"
    f.write_text("reward: rouge-l:0.5,reward_fns:chars:0.25\n")
    with caplog.at_level(logging.WARNING):
        _, cfg = cli.parse(["grpo", "--config", str(f)])
    assert cfg.reward == "rouge-l:0.5,reward_fns:chars:0.25"
    assert caplog.messages == [f"--config {f}: reward names Python code 'reward_fns:chars': its module will be imported and run (named by this file)"]
    p = tmp_path / "pipe.yaml"
    p.write_text("grpo:\n  reward: my_rewards:bleu\nevaluate:\n  best_of_n_reward: rouge-l\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cli.parse(["pipeline", "--config", str(p)])
    assert caplog.messages == [f"--config {p}: grpo.reward names Python code 'my_rewards:bleu': its module will be imported and run (named by this file)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same reward as a flag: the user typed it, nothing to flag
        cli.parse(["grpo", "--reward", "reward_fns:chars"])
    assert caplog.messages == []


@pytest.mark.parametrize("url,refused", [
    ("http://judge.example.com/v1", True), ("http://10.0.0.5:8000/v1", True),
    ("https://judge.example.com/v1", False), ("http://127.0.0.1:8000/v1", False), ("http://localhost:8000/v1", False), ("http://[::1]:8000/v1", False),
])
def test_the_judge_key_is_never_sent_over_plain_http_to_another_machine(url, refused, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    if not refused:
        ChatClient(url, "m")
        return
    with pytest.raises(JudgeError) as e:
        ChatClient(url, "m")
    host = url.split("//")[1].split(":")[0].split("/")[0].lower()
    assert str(e.value) == f"--judge.url {url}: refusing to send the API key ($OPENAI_API_KEY) over plain http to {host}; use https://, a server on this machine, or --judge.api-key-env '' to send no key"
    ChatClient(url, "m", api_key_env="")  # no key: nothing to leak
    monkeypatch.delenv("OPENAI_API_KEY")
    ChatClient(url, "m")


def test_evaluate_refuses_the_judge_key_over_http_in_one_line_before_touching_disk(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    out = tmp_path / "ev"
    code = cli.main(["evaluate", "--policies", f"sft={ckpts[0]}", "--sft-path", ckpts[0], "--rm-path", ckpts[1], "--judge.url", "http://judge.example.com/v1", "--output-dir", str(out)])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tldr-rlhf: error: --judge.url http://judge.example.com/v1: refusing to send the API key ($OPENAI_API_KEY) over plain http "
        "to judge.example.com; use https://, a server on this machine, or --judge.api-key-env '' to send no key"
    )
    assert not out.exists()


def test_a_planted_pickle_does_not_run_on_a_rerun_from_the_runs_own_config_json(tiny_model_dir, tmp_path):
    """A run trusted once (--run.trust-checkpoint), then a state.pt with code planted in it, then the
    README's rerun ``--config RUN/config.json``: refused in one line, the code never runs. The same
    with a config.json of an older tldr-rlhf that recorded ``trust_checkpoint: true``."""
    out = tmp_path / "run"
    first = run_cli(sft_args(tiny_model_dir, out, "--run.trust-checkpoint"))
    assert first.returncode == 0, first.stderr[-2000:]
    config = out / "config.json"
    assert "trust_checkpoint" not in config.read_text()
    shutil.rmtree(out / "final")
    newest = out / "checkpoints" / "step-6" / "state.pt"
    marker = tmp_path / "pwned"
    torch.save({**state(newest.parent), "extra": {"x": Evil(marker)}}, newest)
    refusal = f"tldr-rlhf: error: {newest}: refused: loading it would run pickled code (posix.system)"

    proc = run_cli(["sft", "--config", str(config)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(refusal)
    assert not marker.exists() and not (out / "final").exists()

    old = json.loads(config.read_text())
    old["run"]["trust_checkpoint"] = True  # what config.json held before this change
    config.write_text(json.dumps(old, indent=2))
    proc = run_cli(["sft", "--config", str(config)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(refusal)
    assert f"--config {config}: run.trust_checkpoint ignored" in proc.stderr
    assert not marker.exists() and not (out / "final").exists()
