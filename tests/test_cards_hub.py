"""Issue 27, item 6: model cards through huggingface_hub's ModelCard / ModelCardData with validated
metadata (a license_name where the license is other), the framework versions, no absolute local path,
and the push by ``HfApi.upload_folder`` with ignore patterns."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
from conftest import POSTS

from tldr_rlhf.cards import PUSH_IGNORE, model_card, push_folder, shown_path, validated_card


def _ppo_run(root: Path, **cfg) -> Path:
    run = root / "ppo"
    (run / "final").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"task": "tldr", "train": str(POSTS)}, **cfg}))
    return run


def _meta(text: str):
    from huggingface_hub import ModelCard

    return ModelCard(text).data


def test_license_other_has_a_license_name_and_a_link_to_a_hub_base(tmp_path):
    run = tmp_path / "rm"
    (run / "final").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"path": "Qwen/Qwen2.5-1.5B"}, "data": {"task": "tldr"}}))
    data = _meta(model_card(run, run / "final", stage="rm", step=5))
    assert (data.license, data.license_name, data.license_link) == ("other", "same-as-base-model", "https://huggingface.co/Qwen/Qwen2.5-1.5B")
    # a local start without a card: no base known, the license is still named
    data = _meta(model_card(_ppo_run(tmp_path, sft_path=str(tmp_path / "nowhere")), tmp_path / "ppo" / "final", stage="ppo", step=1))
    assert (data.license, data.license_name, data.license_link) == ("other", "unknown", None)


def test_a_base_cards_own_other_license_is_passed_on(tmp_path):
    base = tmp_path / "sft" / "final"
    base.mkdir(parents=True)
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: qwen-research\nlicense_link: https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/LICENSE\nbase_model: Qwen/Qwen2.5-3B\n---\n")
    data = _meta(model_card(_ppo_run(tmp_path, sft_path=str(base)), tmp_path / "ppo" / "final", stage="ppo", step=1))
    assert (data.base_model, data.license, data.license_name, data.license_link) == ("Qwen/Qwen2.5-3B", "other", "qwen-research", "https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/LICENSE")


def test_the_card_lists_the_framework_versions(tmp_path):
    text = model_card(_ppo_run(tmp_path, rm_path="runs/rm/final"), tmp_path / "ppo" / "final", stage="ppo", step=1)
    section = text.split("## Framework versions\n\n")[1].split("\n\n")[0].splitlines()
    assert section[:4] == [f"- tldr-rlhf: {metadata.version('tldr-rlhf')}", f"- torch: {metadata.version('torch')}",
                           f"- transformers: {metadata.version('transformers')}", f"- peft: {metadata.version('peft')}"]


def test_no_absolute_local_path_reaches_the_card(tmp_path):
    # an SFT checkpoint beside the run (a pipeline's layout), a reward model and data elsewhere on the machine
    run = _ppo_run(tmp_path, sft_path=str(tmp_path / "sft" / "final"), reward=f"{tmp_path.parent}/elsewhere/rm/final:1.5,rouge-l:0.5")
    text = model_card(run, run / "final", stage="ppo", step=2)
    assert str(tmp_path) not in text and str(POSTS) not in text and str(tmp_path.parent) not in text
    assert "starting from `../sft/final`" in text
    assert "Reward: `a local file (final):1.5,rouge-l:0.5`" in text
    assert "Data: `a local file (valid_sample.jsonl)`" in text
    # relative paths and hub ids are shown as given
    assert shown_path("runs/rm/final", run) == "runs/rm/final" and shown_path("Qwen/Qwen2.5-0.5B", run) == "Qwen/Qwen2.5-0.5B"


@pytest.mark.parametrize(("yaml", "message"), [
    ("license: other\n", "model card: license 'other' needs a license_name"),
    ("library_name: transformers\n", "model card: no license"),
    ("license: mit\nbase_model: /home/me/models/base\n", "model card: base_model '/home/me/models/base' is not a hub id"),
])
def test_card_metadata_is_validated(yaml, message):
    with pytest.raises(ValueError, match="^" + message + "$"):
        validated_card(f"---\n{yaml}---\n\n# card\n")
    assert "license: mit" in validated_card("---\nlicense: mit\nbase_model: Qwen/Qwen2.5-0.5B\n---\n\n# card\n")


def test_push_uploads_the_folder_with_ignore_patterns(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)

    def upload_folder(self, **kw):
        kept = sorted(str(p.relative_to(kw["folder_path"])) for p in Path(kw["folder_path"]).rglob("*") if p.is_file())
        calls.append((kw, kept, Path(kw["folder_path"], "README.md").read_text() if Path(kw["folder_path"], "README.md").is_file() else None))

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    run = _ppo_run(tmp_path, rm_path="runs/rm/final")
    ckpt = run / "checkpoints" / "step-3"
    ckpt.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "state.pt", "rng-1.pt"):
        (ckpt / name).write_text("x")
    push_folder(ckpt, "me/ckpt")
    (kw, files, card), = calls
    assert kw["repo_id"] == "me/ckpt" and kw["ignore_patterns"] == PUSH_IGNORE and kw["commit_message"] == "tldr-rlhf: upload step-3"
    from huggingface_hub.utils import filter_repo_objects

    assert list(filter_repo_objects(files, ignore_patterns=kw["ignore_patterns"])) == ["README.md", "config.json", "model.safetensors"]
    assert "for 3 optimizer steps" in card and not (ckpt / "README.md").exists()  # the card is staged, the checkpoint untouched
