"""``tldr-rlhf inspect``: look inside the summaries, token by token (the N+ reference code's
``visualize_tokens.py``).

For each of the first ``--num-posts`` held-out posts (or one ``--post``), every policy's summary is shown
in the terminal token by token, each token coloured by

* its log-prob under the policy, ``log pi(y_t | x, y_<t)`` of logits / temperature (the log-probs the RL
  stages and ``evaluate``'s KL use, N+ detail 21): green near 0 (the policy was sure), red when low; or
* with ``--reference`` (the SFT policy, say), the per-token KL term ``log pi(y_t) - log pi_ref(y_t)``
  (the k1 estimate whose sum over the response is the sequence KL that the PPO penalty and ``evaluate``
  use): red where the policy puts more mass than the reference, blue where less, white near 0;

with the response length, whether it ended with EOS, its summed log-prob and KL, and the reward model's
score (``--rm-path``, read as ``evaluate`` reads it). ``--html FILE`` writes the same view as a page
(hover a token for its numbers) and ``--output FILE`` the numbers as JSON.

Models are loaded one at a time (policies, then the reference, then the reward model).
Shapes: N posts, T response tokens.
"""

from __future__ import annotations

import html as html_lib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from .config import TldrDataArgs
from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InspectConfig:
    """Each policy's summary of held-out posts, token by token, coloured by log-prob or by KL to a
    reference policy, with the reward model's score (terminal, --html, --output JSON)."""

    policies: tuple[str, ...] = ()
    """Policies as NAME=PATH (run folder final/, checkpoints/step-N/, hub id), e.g. sft=runs/sft/final ppo=runs/ppo/final."""
    reference: str = ""
    """Reference policy for the per-token KL (the SFT policy); empty = colour by log-prob."""
    rm_path: str = ""
    """Reward model scoring each summary; empty = no score."""
    data: TldrDataArgs = field(default_factory=TldrDataArgs)
    """Where the held-out posts come from (as in evaluate: `valid`, else the SFT split of a local `train` file)."""
    post: str = ""
    """One post's text to inspect instead of held-out posts."""
    title: str = ""
    """Title of --post."""
    subreddit: str = "AskReddit"
    """Subreddit of --post."""
    num_posts: int = 1
    """Held-out posts shown (the first ones)."""
    response_length: int = 63
    """Maximum new tokens per summary."""
    greedy: bool = True
    """Greedy summaries; False = sampled at `temperature`."""
    temperature: float = 0.7
    """Sampling temperature, and the temperature of the log-probs (logits / temperature, as the RL stages)."""
    seed: int = 42
    """Sampling seed (the same for every policy)."""
    color_by: Literal["auto", "logprob", "kl"] = "auto"
    """Token colour: auto = KL when --reference is given, else log-prob."""
    html: str = ""
    """Also write the view as an HTML page here."""
    output: str = ""
    """Also write the numbers (tokens, log-probs, KL, scores) as JSON here."""
    batch_size: int = 8
    """Sequences per generation / forward pass."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto = float32 on CPU, bfloat16 autocast on CUDA."""


# ----------------------------------------------------------------------------------------------
# Colours


def logprob_rgb(logprob: float) -> tuple[int, int, int]:
    """Colour of a token with log-prob ``logprob`` (nats, <= 0): p = exp(logprob) from red (p = 0)
    through yellow (p = 0.5) to green (p = 1), linear in p."""
    p = min(1.0, max(0.0, math.exp(logprob)))
    if p < 0.5:
        return 230, round(60 + 340 * p), 60  # red -> yellow
    return round(230 - 340 * (p - 0.5)), 230, 60  # yellow -> green


def kl_rgb(kl: float, scale: float = 2.0) -> tuple[int, int, int]:
    """Colour of a per-token KL term ``kl`` (nats): white at 0, red for positive (the policy favours
    the token more than the reference), blue for negative, full colour at |kl| >= ``scale``."""
    a = min(1.0, abs(kl) / scale)
    fade = round(255 - 175 * a)
    return (255, fade, fade) if kl >= 0 else (fade, fade, 255)


# ----------------------------------------------------------------------------------------------
# Numbers


def _posts(cfg: InspectConfig, tokenizers: Sequence) -> list:
    # lazy: `tldr-rlhf inspect --help` parses InspectConfig without transformers
    from .data.tldr import Post
    from .evaluate import held_out_posts

    if cfg.post:
        return [Post("post", cfg.subreddit, cfg.title, cfg.post)]
    return held_out_posts(cfg, tokenizers)[0]


def _token_texts(tok, ids: Sequence[int]) -> list[str]:
    """Each token's own text (the bytes it adds), special tokens by name."""
    return [tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def inspect_policies(cfg: InspectConfig) -> list[dict[str, Any]]:
    """The numbers behind the view: one record per post, {id, subreddit, title, post, reference,
    policies: {NAME: {ids, tokens, logprobs, kl (or None), length, eos, sum_logprob, kl_sum, rm_score}}}.
    ``logprobs`` (T,) are ``rollout.response_logprobs`` at ``cfg.temperature``; ``kl`` (T,) is
    ``logprobs - reference logprobs`` of the same tokens, whose sum is the per-response k1 KL of
    ``metrics.kl_from_logprobs``. Raises ConfigError when a policy's tokenizer differs from the
    reference's (the per-token KL compares the same token ids)."""
    # lazy: `tldr-rlhf inspect --help` parses InspectConfig without transformers
    from .data.batching import collate_query_response
    from .evaluate import parse_policies, score_with
    from .generation import decode_response, generate
    from .modeling import load_causal_lm, load_tokenizer_cached
    from .precision import bf16_autocast
    from .rollout import response_logprobs
    from .summaries import eval_device, free_memory
    from .tasks import query_ids

    if not cfg.policies:
        raise ConfigError("--policies: give at least one NAME=PATH")
    policies = parse_policies(cfg.policies)
    device = eval_device()
    toks = {name: load_tokenizer_cached(path) for name, path in policies.items()}
    posts = _posts(cfg, list(toks.values()))
    records = [{"id": p.id, "subreddit": p.subreddit, "title": p.title, "post": p.post, "reference": p.summary, "policies": {}} for p in posts]
    batches = {}
    # 1. Each policy: its summaries and their log-probs, one model in memory at a time.
    for name, path in policies.items():
        tok = toks[name]
        model = load_causal_lm(path, tokenizer=tok).to(device)
        queries = [query_ids(tok, p, cfg.data) for p in posts]
        torch.manual_seed(cfg.seed)
        with bf16_autocast(device, cfg.dtype):
            responses = generate(model, queries, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=cfg.response_length, temperature=cfg.temperature, greedy=cfg.greedy, batch_size=cfg.batch_size)
            batch = collate_query_response(queries, responses, tok.pad_token_id)
            logprobs, _ = response_logprobs(model, batch, temperature=cfg.temperature, batch_size=cfg.batch_size)
        batches[name] = batch
        for rec, resp, lp in zip(records, responses, logprobs):
            lp = lp[: len(resp)].float().tolist()
            rec["policies"][name] = {
                "ids": list(resp), "tokens": _token_texts(tok, resp), "logprobs": lp, "kl": None, "text": decode_response(tok, resp),
                "length": len(resp) - (1 if resp and resp[-1] == tok.eos_token_id else 0), "eos": bool(resp) and resp[-1] == tok.eos_token_id,
                "sum_logprob": math.fsum(lp), "kl_sum": None, "rm_score": None,
            }
        del model
        free_memory()
    # 2. The reference's log-probs of every policy's tokens: the per-token KL terms.
    if cfg.reference:
        ref_tok = load_tokenizer_cached(cfg.reference)
        for name, tok in toks.items():
            if tok.get_vocab() != ref_tok.get_vocab():
                raise ConfigError(f"--reference {cfg.reference}: its tokenizer differs from policy {name}'s; the per-token KL needs the same token ids")
        ref = load_causal_lm(cfg.reference, tokenizer=ref_tok).to(device)
        with bf16_autocast(device, cfg.dtype):
            for name, batch in batches.items():
                ref_lp, _ = response_logprobs(ref, batch, temperature=cfg.temperature, batch_size=cfg.batch_size)
                for rec, row in zip(records, ref_lp):
                    p = rec["policies"][name]
                    kl = [a - b for a, b in zip(p["logprobs"], row[: len(p["ids"])].float().tolist())]
                    p["kl"], p["kl_sum"] = kl, math.fsum(kl)
        del ref
        free_memory()
    # 3. The reward model's score of each summary, read as evaluate reads it.
    if cfg.rm_path:
        texts = {name: [rec["policies"][name]["text"] for rec in records] for name in policies}
        scores = score_with(cfg.rm_path, posts, texts, cfg)
        for name, values in scores.items():
            for rec, s in zip(records, values):
                rec["policies"][name]["rm_score"] = s
    return records


# ----------------------------------------------------------------------------------------------
# Views


def _by_kl(cfg: InspectConfig) -> bool:
    return cfg.color_by == "kl" or (cfg.color_by == "auto" and bool(cfg.reference))


def _stats(p: dict[str, Any]) -> str:
    parts = [f"{p['length']} tokens" + ("" if p["eos"] else " [no EOS]"), f"sum log-prob {p['sum_logprob']:.2f}"]
    if p["kl_sum"] is not None:
        parts.append(f"KL {p['kl_sum']:.3f}")
    if p["rm_score"] is not None:
        parts.append(f"RM score {p['rm_score']:.3f}")
    return ", ".join(parts)


def render_terminal(records: Sequence[dict[str, Any]], cfg: InspectConfig, console=None) -> None:
    """Print the view with rich: per post its title and reference, per policy its coloured tokens and
    its numbers."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    by_kl = _by_kl(cfg)
    legend = "colour = per-token KL to the reference (red: policy > reference, blue: <)" if by_kl else "colour = token probability (red 0 -> yellow 0.5 -> green 1)"
    console.print(Text(legend, style="dim"))
    for i, rec in enumerate(records, 1):
        console.rule(f"post {i}: r/{rec['subreddit']}: {rec['title']}")
        if rec.get("reference"):
            console.print(Text("reference: ", style="bold") + Text(rec["reference"].strip()))
        for name, p in rec["policies"].items():
            line = Text(f"{name}: ", style="bold")
            for k, token in enumerate(p["tokens"]):
                r, g, b = kl_rgb(p["kl"][k]) if by_kl and p["kl"] is not None else logprob_rgb(p["logprobs"][k])
                line.append(token.replace("\n", "\\n"), style=f"black on rgb({r},{g},{b})")
            console.print(line)
            console.print(Text("  " + _stats(p), style="dim"))


def render_html(records: Sequence[dict[str, Any]], cfg: InspectConfig) -> str:
    """The same view as a self-contained HTML page; each token's title shows its log-prob (and KL)."""
    by_kl = _by_kl(cfg)
    esc = html_lib.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tldr-rlhf inspect</title><style>",
        "body{font-family:sans-serif;max-width:60em;margin:2em auto} .tok{font-family:monospace;white-space:pre-wrap;color:#000}",
        ".stats{color:#555;font-size:90%;margin:0 0 1em 1em}</style></head><body><h1>tldr-rlhf inspect</h1>",
        f"<p>{'Colour: per-token KL to the reference (red: the policy puts more probability on the token than the reference, blue: less).' if by_kl else 'Colour: token probability (red 0, yellow 0.5, green 1).'} "
        f"Log-probs of logits / {cfg.temperature:g}. Hover a token for its numbers.</p>",
    ]
    for i, rec in enumerate(records, 1):
        out.append(f"<h2>Post {i}: r/{esc(rec['subreddit'])}: {esc(rec['title'])}</h2><details><summary>post</summary><p>{esc(rec['post'])}</p></details>")
        if rec.get("reference"):
            out.append(f"<p><b>reference:</b> {esc(rec['reference'].strip())}</p>")
        for name, p in rec["policies"].items():
            spans = []
            for k, token in enumerate(p["tokens"]):
                kl = p["kl"][k] if p["kl"] is not None else None
                r, g, b = kl_rgb(kl) if by_kl and kl is not None else logprob_rgb(p["logprobs"][k])
                tip = f"log-prob {p['logprobs'][k]:.3f}" + (f" | KL {kl:.3f}" if kl is not None else "")
                spans.append(f"<span class='tok' style='background:rgb({r},{g},{b})' title='{esc(tip)}'>{esc(token)}</span>")
            out.append(f"<p><b>{esc(name)}:</b> {''.join(spans)}</p><p class='stats'>{esc(_stats(p))}</p>")
    out.append("</body></html>")
    return "\n".join(out)


def inspect(cfg: InspectConfig) -> list[dict[str, Any]]:
    """``tldr-rlhf inspect``: compute the numbers, print the view, write --html / --output when asked."""
    records = inspect_policies(cfg)
    render_terminal(records, cfg)
    if cfg.html:
        Path(cfg.html).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.html).write_text(render_html(records, cfg))
        print(f"inspect: {cfg.html}")
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(records, indent=1) + "\n")
        print(f"inspect: {cfg.output}")
    return records
