"""Model cards for every ``final/`` and the upload of a run's model to the Hugging Face Hub.

``train.lifecycle.finish_run`` writes ``final/README.md`` (before the completeness marker) from what the run
folder holds: the stage's ``config.json`` (base model, data, the settings that matter), the last value of
each key metric in ``metrics.jsonl``, and for the reward model its ``final/config.json`` (how the score
is read, the normalization applied). The YAML metadata is huggingface_hub's ``ModelCardData``:
``base_model`` (a hub id; a local starting checkpoint passes on the ``base_model`` of its own card, so a
PPO policy names the model its SFT started from), ``datasets`` (hub ids only), ``license`` (the base
model's when its card says, else ``other`` with a ``license_name`` and, when the base is known, a
``license_link`` to it), ``tags``, ``library_name`` and ``pipeline_tag``; the card is parsed back by
``huggingface_hub.ModelCard`` and its metadata checked (``validated_card``) before it is written. The
body names inputs by hub id or by a path relative to the run folder, never by an absolute local path
(``shown_path``: "a local file (NAME)" otherwise), and lists the framework versions it was trained with.

``push_folder`` uploads a model folder through ``huggingface_hub.HfApi.upload_folder``
with ``PUSH_IGNORE`` patterns (``--run.push-to-hub REPO_ID`` at the end of a stage, ``tldr-rlhf push
RUN REPO_ID`` afterwards).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from tyro.conf import Positional, arg

from .checkpoints import COMPLETE, HUB_ID, final_is_complete
from .errors import RunDirError, TldrRlhfError
from .stages import COMMANDS

log = logging.getLogger(__name__)

CARD = "README.md"
# what push leaves out: the completeness marker, training state (state.pt, rng-R.pt, FSDP shards), hidden files
PUSH_IGNORE = [COMPLETE, "*.pt", "sharded/*", ".*", "*/.*"]
FRAMEWORKS = ("tldr-rlhf", "torch", "transformers", "peft", "huggingface_hub")

# The BibTeX entries every card cites; a stage's row adds its own (``stages.Stage.citations``)
BIBTEX = {
    "stiennon2020learning": """@inproceedings{stiennon2020learning,
  title={Learning to summarize from human feedback},
  author={Stiennon, Nisan and Ouyang, Long and Wu, Jeff and Ziegler, Daniel M. and Lowe, Ryan and Voss, Chelsea and Radford, Alec and Amodei, Dario and Christiano, Paul},
  booktitle={NeurIPS},
  year={2020}
}""",
    "huang2024nplus": """@article{huang2024nplus,
  title={The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR Summarization},
  author={Huang, Shengyi and Noukhovitch, Michael and Hosseini, Arian and Rasul, Kashif and Wang, Weixun and Tunstall, Lewis},
  journal={arXiv preprint arXiv:2403.17031},
  year={2024}
}""",
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _hub_id(value: Any) -> str | None:
    """``value`` when it names a hub repo (not an existing local path), else None."""
    return value if isinstance(value, str) and HUB_ID.match(value) and not Path(value).exists() else None


def _card_data_of(path: str) -> dict[str, Any]:
    """The YAML metadata of a local model folder's own card ({} when it has none)."""
    card = Path(path) / CARD
    if not card.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.to_dict()
    except Exception:  # noqa: BLE001 - a hand-written README without metadata
        return {}


def _lineage(start: str) -> tuple[str | None, str | None]:
    """(hub base model, license) for a run that started from ``start``: a hub id is the base itself;
    a local folder passes on its own card's ``base_model`` and ``license``."""
    if not start:
        return None, None
    if _hub_id(start):
        return start, None
    data = _card_data_of(start)
    base = data.get("base_model")
    return (base[0] if isinstance(base, list) and base else base), data.get("license")


def _license(base: str | None, base_license: str | None, start: str) -> dict[str, str]:
    """The license metadata: the base model's license when its card names one (a local starting
    folder's ``license_name`` / ``license_link`` passed on with an ``other``), else ``other`` with the
    ``license_name`` the Hub asks for and, for a known hub base, a ``license_link`` to it."""
    if base_license and base_license != "other":
        return {"license": base_license}
    inherited = _card_data_of(start) if start and not _hub_id(start) else {}
    name = inherited.get("license_name") or ("same-as-base-model" if base else "unknown")
    link = inherited.get("license_link") or (f"https://huggingface.co/{base}" if base else None)
    return {"license": "other", "license_name": name, **({"license_link": link} if link else {})}


def shown_path(value: str, run_path: Path) -> str:
    """How a card names an input: a hub id or a relative path as given; an absolute (or ``~``) path
    inside the run folder's parent relative to the run folder (``../sft/final``); any other local path
    as "a local file (NAME)" / "a local folder (NAME)", so no absolute path reaches a pushed card."""
    if not value or _hub_id(value):
        return value
    p = Path(value)
    if not p.is_absolute() and not value.startswith("~") and ".." not in p.parts:
        return value
    full, home = p.expanduser().resolve(), Path(run_path).resolve()
    if full.is_relative_to(home.parent):
        return os.path.relpath(full, home)
    return f"a local {'folder' if full.is_dir() else 'file'} ({p.name})"


def _shown_spec(spec: str, run_path: Path) -> str:
    """A reward spec (``TERM[:WEIGHT],...``) with each term's path shown by ``shown_path``."""
    terms = []
    for term in spec.split(","):
        head, sep, weight = term.rpartition(":")
        try:
            float(weight)
        except ValueError:
            head, sep, weight = term, "", ""
        terms.append(shown_path(head, run_path) + sep + weight)
    return ",".join(terms)


def framework_versions() -> list[tuple[str, str]]:
    """(distribution, installed version) of ``FRAMEWORKS``; "not installed" for a missing one."""
    from importlib import metadata

    out = []
    for dist in FRAMEWORKS:
        try:
            out.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            out.append((dist, "not installed"))
    return out


def validated_card(text: str) -> str:
    """``text`` (YAML metadata + Markdown) parsed back by ``huggingface_hub.ModelCard`` and checked as
    the Hub checks it on upload: a license, a ``license_name`` when the license is ``other``, hub ids
    for ``base_model`` and ``datasets``. Returns the card as ModelCard writes it. Raises ValueError
    naming the field otherwise."""
    from huggingface_hub import ModelCard

    data = ModelCard(text, ignore_metadata_errors=False).data
    if not data.license:
        raise ValueError("model card: no license")
    if data.license == "other" and not data.license_name:
        raise ValueError("model card: license 'other' needs a license_name")
    for field in ("base_model", "datasets"):
        values = getattr(data, field) or []
        for v in [values] if isinstance(values, str) else values:
            if not HUB_ID.match(str(v)):
                raise ValueError(f"model card: {field} '{v}' is not a hub id")
    return str(ModelCard(text))


def last_metrics(records: list[dict[str, Any]], keys: tuple[tuple[str, str], ...]) -> list[tuple[str, float, int]]:
    """(label, value, step) of the last finite value of each key, in ``keys`` order (keys never
    logged are left out)."""
    out = []
    for key, label in keys:
        found = [(r[key], r.get("step")) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
        if found:
            out.append((label, float(found[-1][0]), found[-1][1]))
    return out


def _records(run_path: Path) -> list[dict[str, Any]]:
    f = run_path / "metrics.jsonl"
    out = []
    if f.is_file():
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _settings(stage: str, cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    """The settings a reader of the card needs, from the stage's config.json (the row's
    ``card_settings``, then the optimizer's, dtype, LoRA rank and seed)."""
    row = COMMANDS.get(stage)
    pick = row.card_settings if row else ()
    rows = [(k, cfg[k]) for k in pick if k in cfg]
    optim = cfg.get("optim") or {}
    rows += [(f"optim.{k}", optim[k]) for k in ("lr", "min_lr", "warmup_steps", "weight_decay") if k in optim]
    for k in ("dtype",):
        if k in cfg:
            rows.append((k, cfg[k]))
    model = cfg.get("model") or {}
    if model.get("dtype"):
        rows.append(("model.dtype", model["dtype"]))
    if model.get("lora_r"):
        rows.append(("model.lora_r", model["lora_r"]))
    rows.append(("run.seed", (cfg.get("run") or {}).get("seed")))
    return rows


def _reward_section(final: Path, run_path: Path) -> str:
    cfg = _read_json(final / "config.json")
    norm, offset = cfg.get("normalization"), cfg.get("reward_offset", 0.0)
    if norm:
        normalization = (
            f"Normalized as in N+ detail 14: the mean raw score of {norm.get('n', '?')} (query, human reference summary) pairs "
            f"from `{shown_path(str(norm.get('source', '?')), run_path)}`, {norm.get('mean_before', offset):.6g}, was subtracted through the head's bias "
            f"(`reward_offset` = {offset:.6g} in config.json; std before {norm.get('std_before', float('nan')):.6g}): "
            "a human reference scores 0 on average."
        )
    elif offset:
        normalization = f"The head's bias holds a normalization offset of {offset:.6g} (`reward_offset`), with no record of what it was computed on."
    else:
        normalization = "No normalization was applied."
    return f"""## How the score is read

The model scores `query + response + EOS` (the response must end with the EOS token `<|endoftext|>` or
the tokenizer's own EOS): a linear head maps the final hidden state **at the EOS position** to one number
(N+ details 11-12). {normalization}

```python
from tldr_rlhf.reward.loading import load_frozen_reward_model  # pip install tldr-rlhf
reward_model = load_frozen_reward_model("PATH_OR_REPO")  # reward_model(input_ids, attention_mask).logits[:, 0]: one score per row, read at its last real token
```

For a stock `AutoModelForSequenceClassification` that loads without `trust_remote_code` (TRL, OpenRLHF),
export it first: `tldr-rlhf export-rm PATH_OR_REPO OUT`.
"""


def _policy_section(task: str) -> str:
    if task == "ultrafeedback":
        prompt = "the instruction in the tokenizer's chat template (or the plain `### Instruction:` / `### Response:` template)"
    else:
        prompt = 'the TL;DR query format `SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:` (N+ detail 1)'
    return f"""## How to use it

The policy continues {prompt} and ends its response with the EOS token.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")
```

or `tldr-rlhf generate --model PATH_OR_REPO --post "..." --title "..."`.
"""


def model_card(run_path: Path, final: Path, *, stage: str, step: int) -> str:
    """The README.md (YAML metadata + Markdown) of a training stage's ``final/`` at optimizer step /
    update ``step``, from the run folder's config.json and metrics.jsonl and ``final/config.json``."""
    from huggingface_hub import ModelCardData

    run_path = Path(run_path)
    cfg = _read_json(run_path / "config.json")
    data = cfg.get("data") or {}
    task = data.get("task", "tldr")
    row = COMMANDS.get(stage)
    family = row.family if row else ""
    start = (cfg.get("model") or {}).get("path") if family == "supervised" else cfg.get("sft_path")
    base, base_license = _lineage(start or "")
    datasets = [d for d in (data.get("train"), data.get("comparisons")) if _hub_id(d)]
    is_rm = stage == "rm"
    card_data = ModelCardData(
        base_model=base,
        datasets=datasets or None,
        **_license(base, base_license, start or ""),
        library_name="transformers",
        pipeline_tag="text-classification" if is_rm else "text-generation",
        tags=["tldr-rlhf", "rlhf", stage] + (["reward-model"] if is_rm else []) + (["summarization"] if task == "tldr" else []),
    )
    title = (row.title if row else "") or f"{stage} model"
    if task == "ultrafeedback":
        title = title.replace("TL;DR", "UltraFeedback")
    lines = [f"# {title} (tldr-rlhf `{stage}`)", ""]
    lines.append(
        f"Trained with tldr-rlhf stage `{stage}` for {step} "
        f"{'updates' if family == 'rl' else 'optimizer steps'}, starting from `{shown_path(start, run_path) if start else '?'}`"
        + (f" (base model `{base}`)" if base and base != start else "") + "."
    )
    if family == "rl":
        lines.append(f"Reward: `{_shown_spec(cfg.get('reward') or cfg.get('rm_path') or '?', run_path)}`; reference policy: the starting policy (frozen).")
    if family == "preference":
        lines.append("Reference policy: the starting policy (frozen).")
    sources = [d for d in (data.get("train"), data.get("valid"), data.get("comparisons")) if d]
    if sources:
        lines.append("Data: " + ", ".join(f"`{shown_path(d, run_path)}`" for d in sources) + ".")
    lines.append("")
    metrics = last_metrics(_records(Path(run_path)), row.card_metrics if row else ())
    if metrics:
        lines += ["## Metrics of the run", "", "| metric | value | step |", "|---|---|---|"]
        lines += [f"| {label} | {value:.4g} | {s} |" for label, value, s in metrics]
        lines.append("")
    settings = _settings(stage, cfg)
    if settings:
        lines += ["## Settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in settings]
        lines += ["", f"The run's whole config is in `config.json` of its run folder (`tldr-rlhf {stage} --config config.json` repeats it).", ""]
    lines.append(_reward_section(Path(final), run_path) if is_rm else _policy_section(task))
    lines += ["## Framework versions", ""] + [f"- {dist}: {version}" for dist, version in framework_versions()] + [""]
    cites = (*BIBTEX.values(), *(row.citations if row else ()))
    lines += ["## Citations", "", "```bibtex", "\n\n".join(cites), "```", ""]
    return validated_card("---\n" + card_data.to_yaml() + "\n---\n\n" + "\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Upload


@dataclass(frozen=True)
class PushArgs:
    """Upload a run's model (final/, with its model card) to the Hugging Face Hub."""

    run: Positional[Annotated[str, arg(metavar="RUN")]]
    """A run folder (its final/ is uploaded), a final/ folder, or a checkpoints/step-N/ folder."""
    repo_id: Positional[Annotated[str, arg(metavar="REPO_ID")]]
    """Hub repo id, NAMESPACE/NAME (created when missing)."""
    private: bool = True
    """Create the repo as private."""
    revision: str = ""
    """Branch to commit to (default: main)."""


def model_folder(run: str | Path) -> Path:
    """The folder ``push`` uploads for ``run``: RUN/final for a run folder, else ``run`` itself.
    Raises RunDirError for a missing folder, a final/ whose save did not finish, or a folder
    without config.json (not a model)."""
    p = Path(run)
    if (p / "final").is_dir():  # a run folder (a model folder never has a final/ inside)
        p = p / "final"
    if not p.is_dir():
        raise RunDirError(f"{run}: no such run or model folder")
    if p.name == "final" and not final_is_complete(p):
        raise RunDirError(f"{p}: the run's final/ is incomplete (its save did not finish); rerun that stage to complete it")
    if not (p / "config.json").is_file():
        raise RunDirError(f"{p}: not a model folder (no config.json); give a run folder, its final/ or a checkpoints/step-N/")
    return p


def _with_card(folder: Path, staging: Path) -> Path:
    """``staging`` holding links to ``folder``'s files and a model card written from its run folder
    (a checkpoint has none; the checkpoint itself is left untouched). Returns ``staging``."""
    marker = _read_json(folder / COMPLETE)
    run_path = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
    stage = marker.get("stage") or _read_json(run_path / "final" / COMPLETE).get("stage") or "sft"
    step = marker.get("step", int(folder.name.split("-")[-1]) if folder.name.startswith("step-") else 0)
    for p in folder.rglob("*"):
        if p.is_file():
            link = staging / p.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(p.resolve())
    (staging / CARD).write_text(model_card(run_path, folder, stage=stage, step=step))
    return staging


def push_folder(folder: Path, repo_id: str, *, private: bool = True, revision: str = "", message: str = "") -> str:
    """Upload ``folder`` (weights, config, tokenizer, README.md; not what ``PUSH_IGNORE`` names: the
    run's COMPLETE.json, a checkpoint's training state, hidden files) to ``repo_id`` by
    ``HfApi.upload_folder``, creating the repo when missing. A folder without README.md is uploaded
    with a card written from its run folder. Returns the commit URL. Raises TldrRlhfError for a bad
    repo id or a failed upload (huggingface_hub's reason in one line)."""
    from huggingface_hub import HfApi

    if not HUB_ID.match(repo_id):
        raise TldrRlhfError(f"{repo_id}: expected a Hub repo id, NAMESPACE/NAME")
    folder = Path(folder)
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="tldr-rlhf-push-") as staging:
        source = folder if (folder / CARD).is_file() else _with_card(folder, Path(staging))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(
                repo_id=repo_id, folder_path=source, ignore_patterns=PUSH_IGNORE, repo_type="model",
                commit_message=message or f"tldr-rlhf: upload {folder.name}", revision=revision or None,
            )
        except Exception as e:  # noqa: BLE001 - network, auth, quota: one line, the run is untouched
            raise TldrRlhfError(f"push to {repo_id} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); log in with `hf auth login` or set HF_TOKEN, then run: tldr-rlhf push {folder} {repo_id}") from e
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    return str(url)


def push(args: PushArgs) -> str:
    """``tldr-rlhf push RUN REPO_ID``: upload a run's model folder; prints and returns the commit URL."""
    folder = model_folder(args.run)
    url = push_folder(folder, args.repo_id, private=args.private, revision=args.revision)
    print(f"pushed {folder} -> {args.repo_id}: {url}")
    return url
