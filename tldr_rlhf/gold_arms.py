"""The runs ("arms") of the gold experiment's direct part, in run order (``gold.run``; docs/gold.md,
docs/learning.md).

An arm is one training run: a method (an RL stage) at a seed, optimizing the gold reward, or a
*variant*: a named copy of a method with some settings changed, run at the first seed only. A variant
is written ``NAME=METHOD;KEY=VALUE;...`` with KEY one of ``VARIANT_KEYS``: ``reward`` (a reward spec,
docs/rewards.md; the arm is then also measured by it) and ``no_eos_penalty`` (a number or ``None``).
Examples: ``rloo-no-eos-penalty=rloo;no_eos_penalty=None``, ``rloo-rouge-1-post=rloo;reward=rouge-1-post``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import ConfigError

VARIANT_KEYS = ("reward", "no_eos_penalty")


@dataclass(frozen=True)
class Arm:
    """One direct run: ``name`` (the run folder's and the records' method name), the ``method`` (stage)
    that trains it, its ``seed``, the ``reward`` spec it optimizes and is measured by, and further
    ``changes`` to the stage's config (field -> value)."""

    name: str
    method: str
    seed: int
    reward: str
    changes: dict[str, Any] = field(default_factory=dict)


def parse_variant(text: str, methods: Sequence[str], *, flag: str = "--variants") -> tuple[str, str, dict[str, Any]]:
    """(name, method, changes) of a variant ``NAME=METHOD;KEY=VALUE;...`` (module docstring). Pure.
    Raises ConfigError (one line naming ``flag``) for a missing name or method, a method not in
    ``methods``, a key not in ``VARIANT_KEYS``, or a no_eos_penalty that is neither a number nor None."""
    name, sep, rest = text.partition("=")
    parts = [p.strip() for p in rest.split(";")]
    if not sep or not name.strip() or not parts[0]:
        raise ConfigError(f"{flag} '{text}': expected NAME=METHOD;KEY=VALUE;...")
    method = parts[0]
    if method not in methods:
        raise ConfigError(f"{flag} '{text}': unknown method '{method}'; methods are {', '.join(methods)}")
    changes: dict[str, Any] = {}
    for part in parts[1:]:
        key, _, value = (s.strip() for s in part.partition("="))
        if key not in VARIANT_KEYS:
            raise ConfigError(f"{flag} '{text}': unknown setting '{key}'; settings are {', '.join(VARIANT_KEYS)}")
        if key == "no_eos_penalty":
            try:
                changes[key] = None if value == "None" else float(value)
            except ValueError:
                raise ConfigError(f"{flag} '{text}': no_eos_penalty must be a number or None, got '{value}'") from None
        else:
            changes[key] = value
    return name.strip(), method, changes


def direct_arms(methods: Sequence[str], seeds: Sequence[int], single_seed_methods: Sequence[str], variants: Sequence[str], gold_reward: str, known: Sequence[str]) -> list[Arm]:
    """Every direct run in run order: at each seed of ``seeds`` the methods of ``methods`` (those in
    ``single_seed_methods`` at the first seed only), then at the first seed the variants. Pure; raises
    ConfigError for a bad variant (``parse_variant``), a repeated name, or a single-seed method that is not
    one of ``methods``."""
    for m in single_seed_methods:
        if m not in methods:
            raise ConfigError(f"--single-seed-methods: '{m}' is not one of --methods ({', '.join(methods)})")
    out = [Arm(m, m, s, gold_reward) for k, s in enumerate(seeds) for m in methods if k == 0 or m not in single_seed_methods]
    for text in variants:
        name, method, changes = parse_variant(text, known)
        if name in methods or any(a.name == name for a in out):
            raise ConfigError(f"--variants '{text}': the name '{name}' is already a method or a variant")
        out.append(Arm(name, method, seeds[0], changes.pop("reward", gold_reward), changes))
    return out


def worker_arms(arms: Sequence[Arm], worker: str) -> tuple[list[Arm], int]:
    """(the arms of worker ``I/N``, I): arm K of ``arms`` (run order, K from 1) belongs to worker
    ((K-1) mod N) + 1, so N processes share the runs with no run trained twice; ``worker`` "" = every arm,
    I = 1. Pure; raises ConfigError (one line naming --worker) unless ``worker`` is "" or I/N with
    1 <= I <= N."""
    if not worker:
        return list(arms), 1
    i, sep, n = worker.partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit() and 1 <= int(i) <= int(n)):
        raise ConfigError(f"--worker '{worker}': expected I/N with 1 <= I <= N, e.g. 1/2")
    i, n = int(i), int(n)
    return [a for k, a in enumerate(arms) if k % n == i - 1], i
