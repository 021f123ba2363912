"""``tldr-rlhf export-rm``: a tldr-rlhf reward model as a stock ``<Arch>ForSequenceClassification``.

Our ``ScalarRewardModel`` (``reward/reward_model.py``) has its own ``model_type`` and loads elsewhere only
with ``trust_remote_code=True``. The export writes the same network as the library's own class for
the backbone's architecture (``Qwen2ForSequenceClassification``, ``LlamaForSequenceClassification``
for SmolLM2, ...; ``num_labels=1``), which ``AutoModelForSequenceClassification.from_pretrained(OUT)``
loads with no remote code:

* weights: the backbone's ``backbone.*`` become the stock class's ``model.*`` and our head's weight
  its ``score.weight``, bit for bit.
* where the score is read: the stock class reads it at the rightmost token that is not
  ``pad_token_id``; ours at the last real token, the response's EOS (N+ detail 11). With Qwen pad =
  EOS (N+ detail 3), so the stock class would read the token before the EOS. The export gives the
  tokenizer and the config a pad token distinct from EOS (``<|fim_pad|>`` for Qwen2.5; see
  ``pick_pad_token``), so on ``query + response + EOS`` rows, padded either side, the stock class
  reads the EOS.
* the head's bias: the stock head is ``Linear(d, 1, bias=False)`` and nothing in front of it can
  carry a constant exactly (the final RMSNorm rescales every hidden unit by the row's own norm, so
  no unit is constant), so the bias cannot be folded into the weights. Our head's bias is
  ``-reward_offset`` (the normalization shift, N+ detail 14; the pairwise loss gives the bias no
  gradient, so training leaves it at its initial 0). The export stores it as ``score_bias`` in the
  config and the card: ``logits[:, 0] + config.score_bias`` is our normalized score (within float
  rounding), and ``logits[:, 0]`` alone is the raw score before normalization. Group-normalized
  advantages (GRPO, RLOO) subtract the group mean, so they are the same either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from tyro.conf import Positional, arg

from .errors import ModelLoadError, RunDirError

# Tokens tried, in order, as the exported pad token: pad tokens of the families we train (Qwen2.5's
# fill-in-the-middle pad, Llama 3's right pad) and the usual spellings.
PAD_CANDIDATES = ("<|fim_pad|>", "<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]")
_CHAT_MARKERS = {"<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"}


@dataclass(frozen=True)
class ExportRMArgs:
    """Export a tldr-rlhf reward model as a stock <Arch>ForSequenceClassification checkpoint that
    AutoModelForSequenceClassification.from_pretrained(OUTPUT) loads without trust_remote_code."""

    model: Positional[Annotated[str, arg(metavar="MODEL")]]
    """The reward model: a `tldr-rlhf rm` run's final/ (or any saved tldr-rlhf reward model folder)."""
    output: Positional[Annotated[str, arg(metavar="OUTPUT")]]
    """Folder to write (must not exist, or be empty)."""


def pick_pad_token(tokenizer) -> str:
    """A special token to pad with that is not EOS: the tokenizer's own pad when it differs from
    EOS, else the first of ``PAD_CANDIDATES`` in its vocabulary, else its highest-id added special
    token that is not EOS / BOS / UNK or a chat marker. Raises ModelLoadError when there is none."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return tokenizer.pad_token
    vocab = tokenizer.get_vocab()
    for token in PAD_CANDIDATES:
        if token in vocab and vocab[token] != eos:
            return token
    taken = {eos, tokenizer.bos_token_id, tokenizer.unk_token_id}
    for token_id, added in sorted(tokenizer.added_tokens_decoder.items(), reverse=True):
        if added.special and token_id not in taken and added.content not in _CHAT_MARKERS:
            return added.content
    raise ModelLoadError("the tokenizer has no special token other than EOS to pad with; the stock classifier needs pad != EOS to read the score at the EOS")


def _card(*, source: str, out: str, arch: str, eos: str, pad: str, bias: float, offset: float, normalization: dict | None) -> str:
    norm = (
        f"Normalization (N+ detail 14): the mean raw score of {normalization.get('n', '?')} (query, reference summary) pairs, "
        f"{normalization.get('mean_before', offset):.6g}, was subtracted (`reward_offset` = {offset:.6g}; std before {normalization.get('std_before', float('nan')):.6g})."
        if normalization
        else f"Normalization: `reward_offset` = {offset:.6g}, with no record of what it was computed on."
        if offset
        else "Normalization: none was applied (`reward_offset` = 0)."
    )
    return f"""---
library_name: transformers
pipeline_tag: text-classification
tags:
- reward-model
- tldr-rlhf
---
# Reward model (exported from tldr-rlhf)

A scalar reward model for TL;DR summaries, exported by `tldr-rlhf export-rm` from `{source}` as a
stock `{arch}` (`num_labels=1`). It loads without remote code:

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained("{out}")  # no trust_remote_code
tok = AutoTokenizer.from_pretrained("{out}")
```

**Append EOS (`{eos}`) to each text before scoring.** The model was trained to read its score at
the response's EOS token: score `query + " " + summary + "{eos}"`. The pad token is `{pad}`
(distinct from EOS), so the model reads the score at the last token that is not `{pad}`: the EOS,
with padding on either side.

```python
batch = tok([query + " " + summary + tok.eos_token for query, summary in pairs], return_tensors="pt", padding=True, add_special_tokens=False)
scores = model(**batch).logits[:, 0] + model.config.score_bias
```

How the score is read: the head `score` (a linear map of the final hidden state to one number) at
the EOS position; `logits[:, 0]` is that number. The stock head has no bias, and none can be folded
into it exactly, so the bias of the original head, `score_bias` = {bias:.9g}, is stored in
`config.json`: `logits[:, 0] + config.score_bias` is the normalized reward, `logits[:, 0]` alone
the raw reward. Group-normalized advantages (GRPO, RLOO) are the same with or without it.

{norm}
"""


def export_reward_model(args: ExportRMArgs) -> dict[str, Any]:
    """Write ``args.output``: a stock ``<Arch>ForSequenceClassification`` (safetensors, config with
    ``pad_token_id`` != EOS, ``score_bias``, ``reward_offset``, ``normalization``), the tokenizer with
    that pad token, and README.md. Prints one line and returns {output, architecture, pad_token,
    score_bias}. Raises ModelLoadError when ``args.model`` is not a tldr-rlhf reward model, RunDirError
    when ``args.output`` exists and is not empty."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    # lazy: `tldr-rlhf export-rm --help` parses ExportRMArgs without torch and transformers
    from .modeling import load_tokenizer
    from .reward.loading import is_reward_checkpoint, load_reward_checkpoint
    from .checkpoints import checkpoint_kind

    if not Path(args.model).exists():
        raise ModelLoadError(f"model path does not exist: {args.model}")
    if not is_reward_checkpoint(args.model):
        what = {"policy": "a policy (causal LM)", "reward_model": "a sequence classifier but not a tldr-rlhf reward model"}.get(checkpoint_kind(args.model), "not a tldr-rlhf reward model")
        raise ModelLoadError(f"{args.model} is {what}; export-rm converts the final/ of a `tldr-rlhf rm` run")
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"{out} exists and is not empty; give a new folder")
    tok = load_tokenizer(args.model, padding_side="right")
    saved = json.loads((Path(args.model) / "config.json").read_text()).get("dtype")
    dtype = getattr(torch, str(saved), None)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float32
    ours = load_reward_checkpoint(args.model, tokenizer=tok, dtype=dtype)  # written back in the dtype it was saved in
    pad = pick_pad_token(tok)
    tok.pad_token = pad
    text = ours.config.text_config.to_dict()
    text.update(num_labels=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config = AutoConfig.for_model(text.pop("model_type"), **{k: v for k, v in text.items() if k not in ("architectures", "id2label", "label2id")})
    stock = AutoModelForSequenceClassification.from_config(config).to(next(ours.parameters()).dtype)
    prefix = stock.base_model_prefix
    missing, unexpected = getattr(stock, prefix).load_state_dict(ours.backbone.state_dict(), strict=False)
    if unexpected or any(not k.endswith("rotary_emb.inv_freq") for k in missing):
        raise ModelLoadError(f"the backbone does not map onto {type(stock).__name__}: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        stock.score.weight.copy_(ours.score.weight)
    bias = float(ours.score.bias.item())
    stock.config.score_bias = bias
    stock.config.reward_offset = float(ours.config.reward_offset or 0.0)
    stock.config.normalization = ours.config.normalization
    arch = type(stock).__name__
    stock.config.architectures = [arch]
    out.mkdir(parents=True, exist_ok=True)
    stock.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    card = _card(source=args.model, out=str(out), arch=arch, eos=tok.eos_token, pad=pad, bias=bias, offset=stock.config.reward_offset, normalization=ours.config.normalization)
    (out / "README.md").write_text(card)
    result = {"output": str(out), "architecture": arch, "pad_token": pad, "pad_token_id": tok.pad_token_id, "eos_token": tok.eos_token, "score_bias": bias}
    print(f"exported {args.model} -> {out}: {arch}, pad {pad!r} (id {tok.pad_token_id}) != EOS {tok.eos_token!r}, score_bias {bias:.6g} (append EOS to each text; see README.md)")
    return result

