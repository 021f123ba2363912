"""Best-of-n as a policy in ``evaluate`` (``--best-of-n N``): n summaries sampled per post from a
policy, the one the best-of-n reward scores highest kept (Stiennon et al. 2020 sec. 4.1 and Appendix
G; Nakano et al. 2021; Gao et al. 2022 "Scaling Laws for Reward Model Overoptimization", where it is
the reference frontier of reward against KL).

Its KL to the policy it samples from is known in closed form, ``KL(pi_bon || pi) = log n - (n - 1) / n``
nats (``analytic_kl``; exact for a reward without ties, an upper bound otherwise: Beirami et al. 2024),
so no log-probs are needed: for the SFT policy that is the KL to SFT the other policies are measured by.

Candidates that end with EOS are preferred over those that do not, whatever their reward (the EOS
trick of the RL stages, N+ detail 23), then the highest reward wins (the first on a tie).

Shapes: N posts, n candidates per post.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Sequence

import torch

from .errors import DataError
from .generation import decode_response
from .precision import bf16_autocast
from .summaries import PolicyRun, eval_engine, free_memory, generate_in_length_order, load_eval_policy

log = logging.getLogger(__name__)


def analytic_kl(n: int) -> float:
    """``log n - (n - 1) / n`` nats: the KL of best-of-n sampling from its base policy (0 at n = 1,
    0.193 at n = 2, 1.835 at n = 16). Raises ValueError for n < 1."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def pick_best(rewards: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
    """Index (N,) of the kept candidate of each post: among those with EOS if any (else among all),
    the highest reward, the first on a tie. Shapes: rewards (N, n) float, has_eos (N, n) bool."""
    key = torch.where(has_eos.any(-1, keepdim=True) & ~has_eos, torch.full_like(rewards, -math.inf), rewards.float())
    best = key.max(-1, keepdim=True).values
    return (key == best).float().argmax(-1)  # the first maximum


def best_of_n_spec(cfg) -> tuple[str, str]:
    """(reward spec, its flag) that picks the best: ``--best-of-n-reward``, else ``--reward``, else the
    judge ``--judge-rm-path``, else ``--rm-path``. Raises DataError when none is set."""
    for name in ("best_of_n_reward", "reward", "judge_rm_path", "rm_path"):
        if getattr(cfg, name):
            return getattr(cfg, name), "--" + name.replace("_", "-")
    raise DataError("--best-of-n needs a reward to pick the best: --best-of-n-reward, --reward, --judge-rm-path or --rm-path", field="best_of_n")


def best_of_n_run(name: str, path: str, posts: list, cfg, *, score: Callable[[list, list[str]], list[float]], seed: int):
    """The best-of-``cfg.best_of_n`` policy of the policy ``path``: n summaries per post sampled at
    ``cfg.temperature`` (up to ``response_length`` tokens), each scored by ``score(posts, texts)``
    (one float per text, posts repeated n times), the best kept (``pick_best``). Returns (a
    ``summaries.PolicyRun`` named ``{name}-bo{n}``, its metrics: n, the base policy, the mean reward of
    all candidates and of the kept ones, the analytic KL). Raises ModelLoadError for a path that does not load."""
    n = cfg.best_of_n
    t0 = time.perf_counter()
    tok, queries, device, model = load_eval_policy(path, posts, cfg)
    engine = eval_engine(model, queries, cfg, group=n)  # --rollout-engine vllm: it samples the candidates
    with bf16_autocast(device, cfg.dtype):
        torch.manual_seed(seed)
        flat = generate_in_length_order(model, [q for q in queries for _ in range(n)], tok, cfg, greedy=False, engine=engine, seed=seed * 1_000_033, desc=f"{name}: best-of-{n} candidates")  # N * n, post-major
    if engine is not None:
        engine.close()
    del model
    free_memory()
    eos = tok.eos_token_id
    texts = [decode_response(tok, r) for r in flat]
    rewards = torch.tensor(score([p for p in posts for _ in range(n)], texts), dtype=torch.float32).view(len(posts), n)
    has_eos = torch.tensor([bool(r) and r[-1] == eos for r in flat]).view(len(posts), n)
    best = pick_best(rewards, has_eos)  # (N,)
    rows = (torch.arange(len(posts)) * n + best).tolist()
    responses = [flat[i] for i in rows]
    run = PolicyRun(
        name=f"{name}-bo{n}", path=path, queries=queries, responses=responses, texts=[texts[i] for i in rows],
        lengths=[len(r) - (1 if r and r[-1] == eos else 0) for r in responses], has_eos=[bool(r) and r[-1] == eos for r in responses],
        seconds=time.perf_counter() - t0,
    )
    metrics: dict[str, Any] = {
        "n": n, "base": name, "candidate_reward_mean": rewards.mean().item(),
        "best_reward_mean": rewards.gather(1, best[:, None]).mean().item(), "candidate_eos_rate": has_eos.float().mean().item(),
        "kl_analytic": analytic_kl(n),
    }
    log.info("best-of-%d of %s: %d candidates in %.1f s; mean reward %.3f of all, %.3f kept; KL to %s %.3f nats (analytic)",
             n, name, len(flat), run.seconds, metrics["candidate_reward_mean"], metrics["best_reward_mean"], name, metrics["kl_analytic"])
    return run, metrics


def best_of_n_names(policies: dict[str, str], chosen: Sequence[str]) -> list[str]:
    """The policies best-of-n runs on: ``chosen`` (``--best-of-n-policies``) in order, or every policy
    when empty. Raises DataError for a name that is not among the policies."""
    for c in chosen:
        if c not in policies:
            raise DataError(f"'{c}' is not one of the policies ({', '.join(policies)})", field="best_of_n_policies")
    return list(chosen) or list(policies)
