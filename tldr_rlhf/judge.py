"""LLM judge of a summary against the human reference through any OpenAI-compatible chat-completions
endpoint (N+ detail 27; the judging protocol of Rafailov et al. 2023 app. D, which the N+ paper used
with gpt-3.5-turbo-0125).

Per pair: the two summaries are put in a random order (a seeded coin per item, recorded), the N+
prompt asks for a one-sentence comparison and then ``Preferred: A`` or ``B``; the letter is mapped back
to policy / reference. A reply with no clear verdict is **counted as unparseable and left out of the
win rate** (the N+ script guessed a random letter instead). A request that still fails after the
retries is counted separately as failed. Nothing here needs the ``openai`` package: requests go
through the standard library's HTTP client to ``{url}/chat/completions``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from .errors import TldrRlhfError

log = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a helpful assistant."
NPLUS_JUDGE_PROMPT = """Which of the following summaries does a better job of summarizing the most important points in the given forum post, without including unimportant or irrelevant details? Judge based on accuracy, coverage, and coherence.

### Post:
{post}

### Summary A:
{summary_a}

### Summary B:
{summary_b}

### Instructions:
FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">
"""

# "Preferred: A", "Preferred: "B"", "**Preferred:** A", "preferred: (b)." ...
_VERDICT = re.compile(r"preferred\s*\**\s*:\s*\**\s*[\"'(\[<]?\s*([AB])\s*[\"')\]>]?\s*\.?\s*\**\s*$", re.IGNORECASE | re.MULTILINE)


class JudgeError(TldrRlhfError):
    """The judge endpoint could not be reached or answered with an error after every retry."""


def build_prompt(post: str, summary_a: str, summary_b: str) -> str:
    """The N+ judge prompt with the post and the two summaries filled in (stripped)."""
    return NPLUS_JUDGE_PROMPT.format(post=post.strip(), summary_a=summary_a.strip(), summary_b=summary_b.strip())


def parse_preference(reply: str) -> str | None:
    """The judge's letter, "A" or "B", from its ``Preferred:`` line; None when there is no such line,
    or when its lines name different letters (unparseable, never guessed)."""
    letters = {m.group(1).upper() for m in _VERDICT.finditer(reply or "")}
    return letters.pop() if len(letters) == 1 else None


@dataclass(frozen=True)
class Verdict:
    """One judged pair. ``policy_first``: the policy summary was shown as A. ``preferred``: "policy",
    "reference", or None (unparseable reply or failed request). ``error``: why the request failed."""

    index: int
    policy_first: bool
    preferred: str | None
    reply: str = ""
    error: str | None = None

    @property
    def outcome(self) -> float | None:
        """1.0 policy preferred, 0.0 reference preferred, None no verdict (for ``evaluate.win_rate``)."""
        return None if self.preferred is None else float(self.preferred == "policy")


def verdict_from_letter(letter: str | None, policy_first: bool) -> str | None:
    """Map the judge's letter back to "policy" / "reference" given the order shown; None stays None."""
    if letter is None:
        return None
    return "policy" if (letter == "A") == policy_first else "reference"


def check_key_transport(url: str, api_key_env: str) -> None:
    """Refuse to send an API key in the clear: raises JudgeError (one line naming ``--judge.url`` and
    the variable) when ``api_key_env`` holds a key and ``url`` is plain ``http://`` to a host that is
    not this machine (``localhost``, a loopback address). https, a local server, or no key pass."""
    import ipaddress
    from urllib.parse import urlsplit

    if not (api_key_env and os.environ.get(api_key_env)) or not url.lower().startswith("http://"):
        return
    host = (urlsplit(url).hostname or "").lower()
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost" or host.endswith(".localhost")
    if not local:
        raise JudgeError(
            f"--judge.url {url}: refusing to send the API key (${api_key_env}) over plain http to {host}; "
            "use https://, a server on this machine, or --judge.api-key-env '' to send no key"
        )


class ChatClient:
    """Minimal OpenAI-compatible chat-completions client (``POST {url}/chat/completions``).

    ``url`` is the API base, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1`` (a
    vLLM / llama.cpp server). The API key is read from the environment variable ``api_key_env``
    (no Authorization header when it is unset, as local servers expect), never over plain http to
    another machine (``check_key_transport``: JudgeError). ``temperature`` < 0 sends
    none (the server's default; N+ sent none). Retries ``retries`` times with exponential backoff on
    connection errors, HTTP 429 and 5xx.
    """

    def __init__(self, url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 1.0, temperature: float = -1.0):
        if not url.startswith(("http://", "https://")):
            raise JudgeError(f"judge url must start with http:// or https://, got {url!r}")
        check_key_transport(url, api_key_env)
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.timeout_s, self.retries, self.backoff_s, self.temperature = timeout_s, retries, backoff_s, temperature

    def complete(self, prompt: str) -> str:
        """The assistant's reply to ``prompt`` (after the N+ system message). Raises JudgeError after
        the last retry, or at once for an HTTP 4xx other than 429 or a reply without a message."""
        body = {"model": self.model, "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]}
        if self.temperature >= 0:
            body["temperature"] = self.temperature
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    payload = json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} from {self.endpoint}"
                if e.code != 429 and e.code < 500:
                    raise JudgeError(last) from None
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                last = f"{type(e).__name__}: {e} ({self.endpoint})"
                continue
            try:
                return payload["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise JudgeError(f"reply from {self.endpoint} has no choices[0].message.content: {str(payload)[:200]}") from None
        raise JudgeError(f"judge request failed after {self.retries + 1} attempts: {last}")


def judge_pairs(
    client: ChatClient, posts: Sequence[str], policy_summaries: Sequence[str], reference_summaries: Sequence[str], *, seed: int = 0, max_parallel: int = 8,
    desc: str = "",
) -> list[Verdict]:
    """Judge each (post, policy summary, reference) with the N+ prompt, the order of the two summaries
    drawn per item from ``random.Random(seed)`` (so runs repeat). Requests run ``max_parallel`` at a
    time, with progress (``progress.progress``) when ``desc`` names them. Returns one Verdict per
    item, in order; failed requests are Verdicts with ``error`` set.
    Raises ValueError for sequences of different lengths."""
    if not len(posts) == len(policy_summaries) == len(reference_summaries):
        raise ValueError(f"lengths differ: {len(posts)} posts, {len(policy_summaries)} policy summaries, {len(reference_summaries)} references")
    rng = random.Random(seed)
    orders = [rng.random() < 0.5 for _ in posts]

    def one(i: int) -> Verdict:
        first = orders[i]
        a, b = (policy_summaries[i], reference_summaries[i]) if first else (reference_summaries[i], policy_summaries[i])
        try:
            reply = client.complete(build_prompt(posts[i], a, b))
        except JudgeError as e:
            return Verdict(i, first, None, "", str(e))
        finally:
            bar.update(1)
        return Verdict(i, first, verdict_from_letter(parse_preference(reply), first), reply)

    from .progress import progress

    with progress(len(posts), desc, unit="pair", enabled=bool(desc)) as bar, ThreadPoolExecutor(max_workers=max(1, max_parallel)) as pool:
        verdicts = list(pool.map(one, range(len(posts))))
    bad = sum(v.preferred is None for v in verdicts)
    if bad:
        log.warning("LLM judge: %d of %d pairs without a verdict (%d failed requests)", bad, len(verdicts), sum(v.error is not None for v in verdicts))
    return verdicts
