"""Model cards in every final/ and the Hub upload (``--run.push-to-hub``, ``tldr-rlhf push``) up to the
network boundary: huggingface_hub's HfApi.create_repo / create_commit are replaced by recorders."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import POSTS

from tldr_rlhf.cards import model_card, model_folder
from tldr_rlhf.cli import main
from tldr_rlhf.config import ModelArgs, OptimArgs, RunArgs, SFTConfig, TldrDataArgs
from tldr_rlhf.errors import ConfigError, RunDirError
from tldr_rlhf.train import sft
from tldr_rlhf.validation import validate_config

BASE_CARD = """---
license: apache-2.0
base_model: Qwen/Qwen2.5-0.5B
---
# a tiny stand-in for a hub model
"""


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a card that names its hub base and license, as a downloaded model has."""
    path = tmp_path_factory.mktemp("base") / "model"
    shutil.copytree(tiny_model_dir, path)
    (path / "README.md").write_text(BASE_CARD)
    return path


@pytest.fixture(scope="module")
def sft_run(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    sft.train(_cfg(base_dir, out))
    return out


def _cfg(model_dir, out, **run):
    return SFTConfig(
        model=ModelArgs(path=str(model_dir)),
        data=TldrDataArgs(train=str(POSTS), max_query_length=96, limit=16, valid_limit=4, valid_fraction=0.01),
        optim=OptimArgs(lr=1.7e-3, min_lr=1e-4, warmup_steps=1, decay_steps=0),
        run=RunArgs(output_dir=str(out), progress=False, eval_every=0, **{"save_every": 1, "max_steps": 2, **run}),
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        num_sample_posts=1,
    )


def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_sft_final_has_a_card_with_lineage_metrics_settings_and_citations(sft_run):
    final = sft_run / "final"
    card = _card(final)
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    assert card.data.tags == ["tldr-rlhf", "rlhf", "sft", "summarization"]
    assert card.data.datasets is None  # a local posts file is no hub dataset
    records = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    last_loss = [r["loss/sft"] for r in records if "loss/sft" in r][-1]
    valid = [r["valid/loss"] for r in records if "valid/loss" in r][-1]
    text = card.text
    assert f"| training loss (last step) | {last_loss:.4g} | 2 |" in text and f"| validation loss | {valid:.4g} | 2 |" in text
    assert "| optim.lr | 0.0017 |" in text and "for 2 optimizer steps" in text and "(base model `Qwen/Qwen2.5-0.5B`)" in text
    assert "@inproceedings{stiennon2020learning" in text and "huang2024nplus" in text
    assert "README.md" in json.loads((final / "COMPLETE.json").read_text())["files"]  # written before the marker


def test_rl_card_names_the_base_its_sft_started_from(sft_run, tmp_path):
    run = tmp_path / "ppo"
    (run / "final").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"sft_path": str(sft_run / "final"), "rm_path": "runs/rm/final", "kl_coef": 0.05, "data": {"task": "tldr", "train": "vwxyzjn/summarize_from_feedback_tldr_3_filtered"}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1, "objective/scores": 0.25, "objective/kl": 0.0}, {"step": 2, "objective/scores": 0.75, "objective/kl": 0.125}]))
    text = model_card(run, run / "final", stage="ppo", step=2)
    assert "base_model: Qwen/Qwen2.5-0.5B" in text and "license: apache-2.0" in text
    assert "- vwxyzjn/summarize_from_feedback_tldr_3_filtered" in text and "- ppo" in text
    assert "| reward-model score (last update) | 0.75 | 2 |" in text and "| KL to the reference (last update) | 0.125 | 2 |" in text
    assert "| kl_coef | 0.05 |" in text and "schulman2017proximal" in text and "Reward: `runs/rm/final`" in text


def test_reward_model_card_says_how_the_score_is_read_and_normalized(tmp_path):
    run = tmp_path / "rm"
    (run / "final").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"path": "Qwen/Qwen2.5-1.5B"}, "data": {"task": "tldr", "comparisons": "openai/summarize_from_feedback"}}))
    norm = {"n": 64, "source": "refs.jsonl", "mean_before": 0.37, "std_before": 1.7}
    (run / "final" / "config.json").write_text(json.dumps({"reward_offset": 0.37, "normalization": norm}))
    text = model_card(run, run / "final", stage="rm", step=5)
    assert "base_model: Qwen/Qwen2.5-1.5B" in text and "license: other" in text and "pipeline_tag: text-classification" in text
    assert "- reward-model" in text and "- openai/summarize_from_feedback" in text
    assert "**at the EOS position**" in text and "the mean raw score of 64 (query, human reference summary) pairs from `refs.jsonl`, 0.37, was subtracted" in text
    assert "std before 1.7" in text and "tldr-rlhf export-rm" in text
    (run / "final" / "config.json").write_text(json.dumps({"reward_offset": 0.0}))
    assert "No normalization was applied." in model_card(run, run / "final", stage="rm", step=5)


class Recorder:
    """Stands in for the Hub: records create_repo / upload_folder (the files huggingface_hub's own
    ``filter_repo_objects`` keeps under the ignore patterns: path, or the card's bytes), or fails like
    a network error."""

    def __init__(self, fail: Exception | None = None):
        self.repos, self.commits, self.fail = [], [], fail

    def install(self, monkeypatch):
        from huggingface_hub import HfApi
        from huggingface_hub.utils import filter_repo_objects

        rec = self

        def create_repo(self, repo_id, **kw):
            rec.repos.append((repo_id, kw))

        def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kw):
            if rec.fail:
                raise rec.fail
            names = filter_repo_objects([str(p.relative_to(folder_path)) for p in sorted(Path(folder_path).rglob("*")) if p.is_file()], ignore_patterns=ignore_patterns)
            files = {n: Path(folder_path, n).read_bytes() if n == "README.md" else str(Path(folder_path, n)) for n in names}
            rec.commits.append((repo_id, files, kw))

            class Info:
                commit_url = f"https://huggingface.co/{repo_id}/commit/abc123"

            return Info()

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


def test_push_command_uploads_final_in_one_commit(sft_run, monkeypatch, capsys):
    rec = Recorder().install(monkeypatch)
    assert main(["push", str(sft_run), "me/tiny-sft", "--no-private"]) == 0
    assert rec.repos == [("me/tiny-sft", {"private": False, "exist_ok": True, "repo_type": "model"})]
    (repo, files, kw), = rec.commits
    final = sft_run / "final"
    want = sorted(str(p.relative_to(final)) for p in final.iterdir() if p.name != "COMPLETE.json")
    assert repo == "me/tiny-sft" and sorted(files) == want and "README.md" in files and "model.safetensors" in files
    assert files["model.safetensors"] == str(final / "model.safetensors")
    assert capsys.readouterr().out.strip() == f"pushed {final} -> me/tiny-sft: https://huggingface.co/me/tiny-sft/commit/abc123"


def test_push_of_a_checkpoint_adds_a_card_and_leaves_out_the_optimizer_state(sft_run, monkeypatch):
    rec = Recorder().install(monkeypatch)
    ckpt = sorted((sft_run / "checkpoints").glob("step-*"))[-1]
    assert main(["push", str(ckpt), "me/tiny-sft-ckpt"]) == 0
    (_, files, _), = rec.commits
    assert "state.pt" not in files and "model.safetensors" in files
    card = files["README.md"].decode()
    assert "base_model: Qwen/Qwen2.5-0.5B" in card and f"for {ckpt.name.split('-')[1]} optimizer steps" in card
    assert not (ckpt / "README.md").exists()  # the card goes to the Hub, the checkpoint is untouched


def test_a_failed_push_is_one_line_and_keeps_everything(sft_run, monkeypatch, capsys):
    Recorder(fail=OSError("network is unreachable")).install(monkeypatch)
    assert main(["push", str(sft_run), "me/tiny-sft"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"tldr-rlhf: error: push to me/tiny-sft failed (OSError: network is unreachable); log in with `hf auth login` or set HF_TOKEN, "
        f"then run: tldr-rlhf push {sft_run / 'final'} me/tiny-sft"
    )
    assert (sft_run / "final" / "COMPLETE.json").is_file()


def test_push_to_hub_at_the_end_of_a_stage_and_when_it_fails(base_dir, tmp_path, monkeypatch, caplog):
    rec = Recorder().install(monkeypatch)
    out = tmp_path / "pushed"
    sft.train(_cfg(base_dir, out, push_to_hub="me/pushed", hub_private=True))
    (repo, files, kw), = rec.commits
    assert repo == "me/pushed" and "README.md" in files and kw["commit_message"] == "tldr-rlhf sft: step 2"
    assert rec.repos[0][1]["private"] is True

    Recorder(fail=OSError("no route")).install(monkeypatch)
    out2 = tmp_path / "not-pushed"
    with caplog.at_level(logging.ERROR):
        final = sft.train(_cfg(base_dir, out2, push_to_hub="me/pushed"))
    assert Path(final, "COMPLETE.json").is_file()  # the run is finished although the upload failed
    assert any("--run.push-to-hub: push to me/pushed failed (OSError: no route)" in r.getMessage() and f"tldr-rlhf push {out2 / 'final'} me/pushed" in r.getMessage() for r in caplog.records)


def test_bad_repo_ids_and_folders_are_one_line(sft_run, tmp_path):
    with pytest.raises(ConfigError, match=r"^--run.push-to-hub tiny-sft: expected a Hub repo id, NAMESPACE/NAME$"):
        validate_config(_cfg(sft_run / "final", tmp_path / "x", push_to_hub="tiny-sft"), check_paths=False)
    with pytest.raises(RunDirError, match="no such run or model folder"):
        model_folder(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(sft_run, broken)
    (broken / "final" / "COMPLETE.json").unlink()
    with pytest.raises(RunDirError, match="final/ is incomplete"):
        model_folder(broken)
    assert model_folder(sft_run) == sft_run / "final" and model_folder(sft_run / "final") == sft_run / "final"


def test_online_dpo_card_names_its_reward_and_both_dpo_papers(tmp_path):
    run = tmp_path / "odpo"
    (run / "final").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"sft_path": "Qwen/Qwen2.5-0.5B", "reward": "rouge-l", "rm_path": "", "data": {"task": "tldr"}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "objective/scores": 0.17, "loss/policy": 0.6931}) + "\n")
    text = model_card(run, run / "final", stage="online-dpo", step=3)
    assert "# online-DPO-trained TL;DR policy (tldr-rlhf `online-dpo`)" in text and "for 3 updates" in text
    assert "Reward: `rouge-l`" in text and "| DPO loss (last update) | 0.6931 | 3 |" in text
    assert text.count("@article{guo2024direct") == 1 and text.count("rafailov2023direct") == 1
