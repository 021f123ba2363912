"""The gold-reward experiment (``tldr-rlhf gold``, the pipeline's optional stage ``gold``; docs/gold.md).

A reward whose value is known exactly, ROUGE-L F1 against the post's human reference (``--gold-reward``,
any spec of ``reward/specs.py``), stands in for human judgement, so that what each method does to it can be
measured on posts the training never saw (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization", sec. 2, with a synthetic gold reward in place of their gold reward model).

direct: from the SFT checkpoint, each of ``methods`` (PPO, GRPO, RLOO, online DPO: the stages' own
``train``) optimizes the gold reward on training posts, once per seed. Each run checkpoints every
``eval_every`` updates; after the run its checkpoints and final policy are evaluated (``evaluate``) on
the held-out posts: gold reward, KL to SFT, length, EOS rate.

proxy: two summaries per training post sampled from the SFT policy, each scored by the gold reward as
the RL stages score it (a response without EOS gets the no-EOS penalty), the higher one chosen (ties
left out: ``label_pair``); the pairs, written in OpenAI's comparison format (``comparison_record``),
train a proxy reward model with the reward-model stage (``train.rm``). Each of ``proxy_methods``
optimizes the proxy, evaluated as above with the proxy's score beside the gold one; best-of-n of SFT
picked by the proxy (``best_of_n.py``, analytic KL) is the reference frontier.

Layout of ``output_dir``::

    direct/METHOD-sSEED/   proxy/METHOD-sSEED/   each a normal RL run folder (checkpoints/step-N/, final/)
    proxy/pairs.jsonl      the gold-labelled SFT pairs; proxy/rm/ the proxy reward model's run folder
    eval/NAME/             an evaluate output folder per run (eval.json, policies/) and its records.json
    eval/direct-greedy/    with greedy_final: greedy summaries of SFT and every direct run's final policy
    gold.json              every record, written when the experiment is complete (the pipeline's marker)

A record is one policy measured on the held-out posts: experiment ("direct" / "proxy"), method ("sft",
"sft-resampled": the SFT policy at another sampling seed, "ppo", ..., "best-of-n"), seed, update, episodes, n (best-of-n), gold, proxy, kl (nats per response, to
SFT), length (tokens, EOS excluded), eos_rate, path. Rerunning resumes: a finished run (final/) is not
trained again, an evaluation with its records.json is not redone, a half-finished run resumes from its
newest checkpoint (the stage's own resume). ``--worker I/N`` shares the direct runs among N processes
(``gold_arms.worker_arms``); the run without it then does the rest.

The held-out gold reward is the mean ROUGE-L of the summaries' text (``evaluate --reward``), whether or
not they end with EOS; the EOS rate is reported beside it. Training sees the no-EOS penalty instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Sequence

from .checkpoints import COMPLETE, final_is_complete
from .config import GoldConfig
from .errors import DataError
from .stages import COMMANDS, EVAL_FILE, GOLD_FILE, STAGES
from .evaluate import evaluate
from .generation import decode_response
from .gold_arms import direct_arms, worker_arms
from .modeling import load_tokenizer_cached
from .reward.specs import check_reward_spec, score_texts
from .summaries import free_memory, generate_in_length_order, load_eval_policy
from .tasks import load_post_splits, query_ids, reference_of

log = logging.getLogger(__name__)

# method -> GoldConfig field: every RL stage (the stage table's "rl" family) that GoldConfig has a section for
METHOD_FIELDS = {s.name: s.name.replace("-", "_") for s in STAGES if s.family == "rl" and s.name.replace("-", "_") in {f.name for f in dataclasses.fields(GoldConfig)}}
SFT_RESAMPLED = "sft-resampled"  # the method of the SFT policy's measurements at further sampling seeds
RECORDS_FILE = "records.json"
GREEDY_EVAL = "direct-greedy"  # the evaluation folder of the final policies' greedy summaries (greedy_final)
PAIRS_FILE = "pairs.jsonl"
_KEEP_ALL = 1_000_000  # keep_checkpoints of the runs: every checkpoint is a measurement point


# ----------------------------------------------------------------------------------------------
# Pure parts: labels, records, episodes


def label_pair(gold_a: float, gold_b: float) -> int | None:
    """The preferred summary of a pair by its gold rewards: 0 when the first scores higher, 1 when the
    second does, None on a tie (no preference: the pair is left out)."""
    if gold_a == gold_b:
        return None
    return 0 if gold_a > gold_b else 1


def gold_with_penalty(scores: Sequence[float], has_eos: Sequence[bool], no_eos_penalty: float | None) -> list[float]:
    """The gold reward as the RL stages see it (N+ detail 23): each response's score when it ended with
    EOS, else ``no_eos_penalty`` (None: every score as it is). Shapes: N scores, N flags -> N floats."""
    if len(scores) != len(has_eos):
        raise ValueError(f"{len(scores)} scores for {len(has_eos)} responses")
    if no_eos_penalty is None:
        return [float(s) for s in scores]
    return [float(s) if e else float(no_eos_penalty) for s, e in zip(scores, has_eos)]


def comparison_record(post, texts: tuple[str, str], golds: tuple[float, float], *, policy: str = "sft") -> dict[str, Any] | None:
    """One gold-labelled pair in OpenAI's comparison format (what ``tldr-rlhf rm`` reads): ``info`` (id,
    subreddit, title, post), ``summaries`` (text, policy, note with the gold reward), ``choice`` (the
    higher gold reward), ``split``, ``worker``, ``batch``. None when the pair carries no preference (equal
    gold rewards) or the two texts are the same."""
    choice = label_pair(*golds)
    if choice is None or texts[0].strip() == texts[1].strip():
        return None
    return {
        "info": {"id": str(post.id), "subreddit": post.subreddit, "title": post.title, "post": post.post},
        "summaries": [{"text": t, "policy": policy, "note": f"gold {g:.6f}"} for t, g in zip(texts, golds)],
        "choice": choice,
        "split": "train",
        "worker": "gold-reward",
        "batch": "gold",
    }


def episodes_per_update(method: str, stage_cfg) -> int:
    """Responses sampled per update of a method's run: PPO's rollout batch, GRPO / RLOO's prompts x G,
    online DPO's prompts x 2."""
    if method == "ppo":
        return stage_cfg.rollout_batch_size
    return stage_cfg.rollout_prompts * stage_cfg.group_size


def records_from_eval(results: dict[str, Any], points: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of the policies of one ``evaluate`` result (``eval.json``): for each name of ``points``
    (its experiment, method, seed, update, episodes, n, path) the held-out gold reward (``reward``),
    proxy score (``rm_score``, None without a proxy), KL to SFT (``kl_to_sft``), mean length and EOS
    rate. Raises DataError for a name the results do not hold."""
    out = []
    for name, point in points.items():
        m = results.get("policies", {}).get(name)
        if m is None:
            raise DataError(f"evaluation results hold no policy '{name}'", field="policies")
        out.append({
            **point, "policy": name, "gold": m.get("reward"), "proxy": m.get("rm_score"), "kl": m.get("kl_to_sft"),
            "length": m.get("mean_length"), "eos_rate": m.get("eos_rate"),
        })
    return out


def read_gold_records(gold_dir: str | Path) -> tuple[list[dict[str, Any]], bool]:
    """(records, complete) of a gold experiment folder: gold.json's when it exists (complete), else
    every finished evaluation's records.json so far (partial). ([], False) for a folder without any."""
    gold_dir = Path(gold_dir)
    final = gold_dir / GOLD_FILE
    if final.is_file():
        return json.loads(final.read_text())["records"], True
    out = []
    for f in sorted((gold_dir / "eval").glob(f"*/{RECORDS_FILE}")):
        out += json.loads(f.read_text())
    return out, False


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Runs


def run_name(method: str, seed: int) -> str:
    """A run's folder name: METHOD-sSEED."""
    return f"{method}-s{seed}"


def eval_name(record: dict[str, Any]) -> str:
    """The evaluation folder (under eval/) a record was measured in: EXPERIMENT-METHOD-sSEED for a run,
    direct-sft for the SFT policy of the direct experiment, proxy-best-of-n for SFT and best-of-n of
    the proxy experiment. (Policy names repeat across folders: ppo-s1-u3 is in direct- and proxy-ppo-s1.)"""
    if record["method"] == SFT_RESAMPLED:
        return f"direct-sft-r{record['seed']}"
    if record["method"] in ("sft", "best-of-n"):
        return "direct-sft" if record["experiment"] == "direct" else "proxy-best-of-n"
    return f"{record['experiment']}-{run_name(record['method'], record['seed'])}"


def method_config(cfg: GoldConfig, method: str, seed: int, *, reward: str, output_dir: Path):
    """The stage config of one run: the method's section of ``cfg`` with the SFT checkpoint, the reward
    (the gold spec or the proxy reward model's path; no ``rm_path``), the experiment's data, the seed,
    the output folder and a checkpoint every ``eval_every`` updates (all kept)."""
    stage_cfg = getattr(cfg, METHOD_FIELDS[method])
    run = dataclasses.replace(
        stage_cfg.run, output_dir=str(output_dir), seed=seed, save_every=cfg.eval_every, keep_checkpoints=_KEEP_ALL,
        **({"num_threads": cfg.num_threads} if cfg.num_threads else {}),
    )
    return dataclasses.replace(stage_cfg, sft_path=cfg.sft_path, rm_path="", reward=reward, tokenizer=None, data=cfg.data, run=run)


def measured_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(update, folder) of a finished run's checkpoints (``checkpoints/step-N/`` with weights) and its
    ``final/`` (the update its completeness marker records), in update order."""
    points = []
    for c in (run_dir / "checkpoints").glob("step-*"):
        if (c / "model.safetensors").is_file() or (c / "adapter_model.safetensors").is_file():
            points.append((int(c.name.removeprefix("step-")), c))
    final = run_dir / "final"
    step = json.loads((final / COMPLETE).read_text())["step"]
    points = [p for p in points if p[0] < step] + [(int(step), final)]
    return sorted(points)


def _drop_training_state(run_dir: Path) -> None:
    """A finished run's checkpoints keep their weights (measured) but not their optimizer state
    (``state.pt``: resume only; twice the weights' size)."""
    for state in (run_dir / "checkpoints").glob("step-*/state.pt"):
        state.unlink()


def train_run(cfg: GoldConfig, method: str, stage_cfg) -> Path:
    """Train one run unless its final/ is complete; returns the run folder."""
    out = Path(stage_cfg.run.output_dir)
    if final_is_complete(out / "final"):
        log.info("gold: %s already trained", out)
    else:
        t0 = time.perf_counter()
        COMMANDS[method].function()(stage_cfg)
        log.info("gold: %s trained in %.1f min", out, (time.perf_counter() - t0) / 60)
    _drop_training_state(out)
    return out


def evaluation(cfg: GoldConfig, name: str, policies: dict[str, str], *, rm_path: str = "", best_of_n: int = 0):
    """``evaluate`` of ``policies`` ({name: path}) on the held-out posts into ``eval/NAME``: gold reward,
    KL to SFT, length, EOS rate, and the proxy's score when ``rm_path`` is given; with ``best_of_n`` n,
    best-of-n of the policy "sft" picked by ``rm_path``. Returns the results (``evaluate.evaluate``)."""
    ecfg = dataclasses.replace(
        cfg.evaluate, policies=tuple(f"{k}={v}" for k, v in policies.items()), sft_path=cfg.sft_path, rm_path=rm_path, judge_rm_path="",
        reward=cfg.gold_reward, best_of_n=best_of_n, best_of_n_reward=rm_path if best_of_n else "", best_of_n_policies=("sft",) if best_of_n else (),
        data=cfg.data, output_dir=str(Path(cfg.output_dir) / "eval" / name),
        **({"num_threads": cfg.num_threads} if cfg.num_threads else {}),
    )
    return evaluate(ecfg)


def measure_run(cfg: GoldConfig, experiment: str, method: str, seed: int, run_dir: Path, stage_cfg, *, rm_path: str = "", label: str = "") -> list[dict[str, Any]]:
    """Held-out records of every measured checkpoint of a finished run (read back when its evaluation's
    records.json exists); ``label`` (a variant's name, ``gold_arms``) names the records' method, else ``method``."""
    per_update = episodes_per_update(method, stage_cfg)
    method = label or method
    name = eval_name({"experiment": experiment, "method": method, "seed": seed})
    done = Path(cfg.output_dir) / "eval" / name / RECORDS_FILE
    if done.is_file():
        return json.loads(done.read_text())
    points, policies = {}, {}
    for update, path in measured_checkpoints(run_dir):
        pname = f"{method}-s{seed}-u{update}"
        policies[pname] = str(path)
        points[pname] = {"experiment": experiment, "method": method, "seed": seed, "update": update, "episodes": update * per_update, "n": None, "path": str(path)}
    records = records_from_eval(evaluation(cfg, name, policies, rm_path=rm_path), points)
    _write_json(done, records)
    return records


def _measure_sft_point(cfg: GoldConfig, point: dict[str, Any]) -> list[dict[str, Any]]:
    """The SFT policy's held-out record for ``point`` (its experiment, method, seed, ...), evaluated with
    ``cfg.evaluate`` into ``eval/`` + ``eval_name(point)``; read back when that folder's records.json
    exists."""
    name = eval_name(point)
    done = Path(cfg.output_dir) / "eval" / name / RECORDS_FILE
    if not done.is_file():
        _write_json(done, records_from_eval(evaluation(cfg, name, {"sft": cfg.sft_path}), {"sft": point}))
    return json.loads(done.read_text())


def measure_sft(cfg: GoldConfig) -> list[dict[str, Any]]:
    """The SFT policy's held-out record (update 0, KL 0) of the direct experiment."""
    return _measure_sft_point(cfg, {"experiment": "direct", "method": "sft", "seed": None, "update": 0, "episodes": 0, "n": None, "path": cfg.sft_path})


def measure_sft_resampled(cfg: GoldConfig) -> list[dict[str, Any]]:
    """The SFT policy measured again at each sampling seed of ``cfg.sft_resample_seeds`` (method
    ``SFT_RESAMPLED``, seed = the sampling seed, update 0, KL 0), each in its own evaluation folder: the
    spread of these and the first measurement is what a policy identical to SFT shows on these posts,
    the resolution of the held-out measurement."""
    records = []
    for s in cfg.sft_resample_seeds:
        seeded = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, seed=s))
        records += _measure_sft_point(seeded, {"experiment": "direct", "method": SFT_RESAMPLED, "seed": s, "update": 0, "episodes": 0, "n": None, "path": cfg.sft_path})
    return records


def measure_best_of_n(cfg: GoldConfig, rm_path: str) -> list[dict[str, Any]]:
    """SFT (n = 1) and best-of-n of SFT for each n of ``cfg.best_of_n``, picked by the proxy reward model,
    with proxy and gold reward; one evaluation folder, the SFT summaries generated once."""
    folder = Path(cfg.output_dir) / "eval" / "proxy-best-of-n"
    done = folder / RECORDS_FILE
    if done.is_file():
        return json.loads(done.read_text())
    sft_point = {"experiment": "proxy", "method": "sft", "seed": None, "update": 0, "episodes": 0, "n": 1, "path": cfg.sft_path}
    records: list[dict[str, Any]] = []
    for k, n in enumerate(cfg.best_of_n or (0,)):
        results = evaluation(cfg, "proxy-best-of-n", {"sft": cfg.sft_path}, rm_path=rm_path, best_of_n=n)
        _write_json(folder / f"eval-bo{n}.json", results)
        points = {"sft": sft_point} if k == 0 else {}
        if n:
            points[f"sft-bo{n}"] = {"experiment": "proxy", "method": "best-of-n", "seed": None, "update": None, "episodes": None, "n": n, "path": cfg.sft_path}
        records += records_from_eval(results, points)
    _write_json(done, records)
    return records


def measure_greedy_finals(cfg: GoldConfig, finals: dict[str, str], folder: str = GREEDY_EVAL) -> dict[str, Any] | None:
    """With ``cfg.greedy_final``: greedy summaries (no sampling noise) of the SFT policy ("sft") and of
    ``finals`` ({run name: final/ path}) on ``cfg.greedy_posts`` held-out posts (0 = all), gold reward,
    length and EOS rate without KL, in ``eval/direct-greedy/`` (every policy on the same posts, so the
    report can pair them post by post; ``folder`` under eval/ for the variants measured by another reward). Returns the evaluation results (read back when its eval.json
    holds these policies); None when off."""
    if not cfg.greedy_final:
        return None
    policies = {"sft": cfg.sft_path, **finals}
    done = Path(cfg.output_dir) / "eval" / folder / EVAL_FILE
    if done.is_file() and set((results := json.loads(done.read_text())).get("policies", {})) == set(policies):
        return results
    greedy = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, greedy=True, kl=False, num_posts=cfg.greedy_posts))
    return evaluation(greedy, folder, policies)


def greedy_folder(reward: str) -> str:
    """The greedy evaluation folder (under eval/) of the direct runs that optimize ``reward``: ``GREEDY_EVAL``
    for the gold reward, ``GREEDY_EVAL``-REWARD (characters other than letters, digits, '-' and '.' as '_') else."""
    return f"{GREEDY_EVAL}-" + "".join(c if c.isalnum() or c in "-." else "_" for c in reward)


def sample_proxy_pairs(cfg: GoldConfig, out_file: Path) -> dict[str, Any]:
    """Step 1 of the proxy experiment: two summaries per training post (``proxy_pairs`` posts, a seeded
    shuffle of the training side of ``cfg.data``) sampled from the SFT policy at the PPO section's
    temperature and response length, scored by the gold reward with the no-EOS penalty
    (``gold_with_penalty``), labelled (``comparison_record``) and written to ``out_file`` in OpenAI's
    comparison format. Returns counts (posts, pairs, tied, identical, gold of chosen / rejected)."""
    import torch

    rl = cfg.ppo
    train_posts, _ = load_post_splits(cfg.data)
    order = list(range(len(train_posts)))
    random.Random(cfg.seeds[0] if cfg.seeds else 0).shuffle(order)
    ecfg = dataclasses.replace(cfg.evaluate, data=cfg.data, response_length=rl.response_length, temperature=rl.temperature)
    tok = load_tokenizer_cached(cfg.sft_path)
    posts = []
    for i in order:
        if len(posts) >= cfg.proxy_pairs:
            break
        try:
            query_ids(tok, train_posts[i], cfg.data)
        except DataError:
            continue
        posts.append(train_posts[i])
    if not posts:
        raise DataError("no training posts for the proxy pairs", path=cfg.data.train)
    tok, queries, device, model = load_eval_policy(cfg.sft_path, posts, ecfg)
    torch.manual_seed((cfg.seeds[0] if cfg.seeds else 0) * 1_009 + 17)
    flat = generate_in_length_order(model, [q for q in queries for _ in range(2)], tok, ecfg, greedy=False)  # 2N, post-major
    del model
    free_memory()
    eos = tok.eos_token_id
    texts = [decode_response(tok, r) for r in flat]
    has_eos = [bool(r) and r[-1] == eos for r in flat]
    terms = check_reward_spec(cfg.gold_reward, flag="--gold-reward")
    refs = [reference_of(p).strip() for p in posts for _ in range(2)]
    q_text = [tok.decode(q) for q in queries for _ in range(2)]
    penalty = rl.no_eos_penalty if cfg.proxy_no_eos_penalty else None  # issue 26: labels without the EOS trick
    gold = gold_with_penalty(score_texts(terms, q_text, texts, refs, flag="--gold-reward").tolist(), has_eos, penalty)
    records, tied, same = [], 0, 0
    for i, p in enumerate(posts):
        a, b = 2 * i, 2 * i + 1
        rec = comparison_record(p, (texts[a], texts[b]), (gold[a], gold[b]))
        if rec is None:  # no preference: equal gold rewards, else the same text twice
            tied_pair = label_pair(gold[a], gold[b]) is None
            tied, same = tied + tied_pair, same + (not tied_pair)
            continue
        records.append(rec)
    tmp = out_file.with_name(out_file.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, out_file)
    chosen = [float(r["summaries"][r["choice"]]["note"].split()[1]) for r in records]
    rejected = [float(r["summaries"][1 - r["choice"]]["note"].split()[1]) for r in records]
    stats = {
        "posts": len(posts), "pairs": len(records), "tied": tied, "identical": same, "eos_rate": sum(has_eos) / len(has_eos),
        "chosen_gold_mean": sum(chosen) / max(1, len(chosen)), "rejected_gold_mean": sum(rejected) / max(1, len(rejected)),
    }
    log.info("gold: proxy pairs %s", stats)
    return stats


def train_proxy_rm(cfg: GoldConfig, pairs: Path, out: Path) -> Path:
    """Step 2 of the proxy experiment: the reward-model stage on the gold-labelled pairs, from the SFT
    checkpoint (``proxy_rm_from_sft``, else ``proxy_rm.model``; its held-out pairs: a share of the posts by id, ``proxy_rm.data.valid_fraction``);
    returns its final/ (not retrained when complete)."""
    final = out / "final"
    if final_is_complete(final):
        return final
    rm = cfg.proxy_rm
    run = dataclasses.replace(rm.run, output_dir=str(out), seed=cfg.seeds[0] if cfg.seeds else rm.run.seed, **({"num_threads": cfg.num_threads} if cfg.num_threads else {}))
    data = dataclasses.replace(rm.data, task="tldr", comparisons=str(pairs), valid_comparisons="", max_query_length=cfg.data.max_query_length)
    model = dataclasses.replace(rm.model, path=cfg.sft_path) if cfg.proxy_rm_from_sft else rm.model
    COMMANDS["rm"].function()(dataclasses.replace(rm, model=model, data=data, run=run))  # the reward-model stage (train/ is imported when it runs)
    return final


# ----------------------------------------------------------------------------------------------
# The experiment


def run(cfg: GoldConfig) -> dict[str, Any]:
    """Run the gold experiment (module docstring) into ``cfg.output_dir``, resuming what a previous
    invocation left; writes gold.json (every record, the proxy pairs' counts, seconds) at the end and
    returns it. Raises DataError for a missing SFT checkpoint or an unknown method, ConfigError for a bad
    variant (``gold_arms``), before anything runs."""
    import torch

    if not cfg.sft_path or not Path(cfg.sft_path).exists():
        raise DataError(f"the gold experiment needs an SFT checkpoint (--sft-path), got '{cfg.sft_path}'", field="sft_path")
    for m in (*cfg.methods, *cfg.proxy_methods):
        if m not in METHOD_FIELDS:
            raise DataError(f"unknown method '{m}'; methods are {', '.join(METHOD_FIELDS)}", field="methods")
    arms = direct_arms(cfg.methods, cfg.seeds, cfg.single_seed_methods, cfg.variants, cfg.gold_reward, list(METHOD_FIELDS))
    arms, worker = worker_arms(arms, cfg.worker)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    root = Path(cfg.output_dir)
    (root / "eval").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = measure_sft(cfg) + measure_sft_resampled(cfg) if worker == 1 else []
    pair_stats: dict[str, Any] = {}
    proxy_rm = ""
    finals: dict[str, dict[str, str]] = {}  # reward spec -> {run name: final/} of the direct runs (the greedy measurement)
    for seed in cfg.seeds:
        for arm in (a for a in arms if a.seed == seed):
            arm_cfg = dataclasses.replace(cfg, gold_reward=arm.reward)
            stage_cfg = dataclasses.replace(method_config(arm_cfg, arm.method, seed, reward=arm.reward, output_dir=root / "direct" / run_name(arm.name, seed)), **arm.changes)
            run_dir = train_run(cfg, arm.method, stage_cfg)
            records += measure_run(arm_cfg, "direct", arm.method, seed, run_dir, stage_cfg, label=arm.name if arm.name != arm.method else "")
            finals.setdefault(arm.reward, {})[run_name(arm.name, seed)] = str(run_dir / "final")
        if cfg.worker or (not cfg.proxy_methods and not cfg.best_of_n):
            continue
        if not proxy_rm:
            pairs = root / "proxy" / PAIRS_FILE
            stats_file = root / "proxy" / "pairs_stats.json"
            if not pairs.is_file():
                pairs.parent.mkdir(parents=True, exist_ok=True)
                _write_json(stats_file, sample_proxy_pairs(cfg, pairs))
            pair_stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
            proxy_rm = str(train_proxy_rm(cfg, pairs, root / "proxy" / "rm"))
            records += measure_best_of_n(cfg, proxy_rm)
        for method in cfg.proxy_methods:
            stage_cfg = method_config(cfg, method, seed, reward=proxy_rm, output_dir=root / "proxy" / run_name(method, seed))
            records += measure_run(cfg, "proxy", method, seed, train_run(cfg, method, stage_cfg), stage_cfg, rm_path=proxy_rm)
    if cfg.worker:  # one of several processes: the parts that need every run come in the run without --worker
        log.info("gold: worker %s done (%d runs); when every worker is done, run again without --worker for gold.json", cfg.worker, len(arms))
        return {"records": records, "worker": cfg.worker, "seconds": round(time.perf_counter() - t0, 1)}
    greedy = measure_greedy_finals(cfg, finals.get(cfg.gold_reward, {}))
    for reward, runs in finals.items():  # variants optimizing another reward: SFT and them, measured by that reward
        if reward != cfg.gold_reward:
            measure_greedy_finals(dataclasses.replace(cfg, gold_reward=reward), runs, folder=greedy_folder(reward))
    result = {
        "records": records, "proxy_pairs": pair_stats, "proxy_rm": proxy_rm, "gold_reward": cfg.gold_reward,
        "greedy_eval": str(root / "eval" / GREEDY_EVAL) if greedy is not None else "", "seconds": round(time.perf_counter() - t0, 1),
    }
    _write_json(root / GOLD_FILE, result)
    log.info("gold: %d held-out measurements in %s", len(records), root / GOLD_FILE)
    return result
