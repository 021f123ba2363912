"""The configs of the commands that run or measure other stages: evaluate-rm, evaluate, the gold
experiment, the report and the pipeline (which composes every stage's config).

This module knows nothing about how a stage trains; it composes the stage configs of ``supervised.py``
and ``rl.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from tyro.conf import Positional, arg

from ..stages import DEFAULT_PIPELINE_STAGES
from .parts import SHARED, JudgeArgs, PreferenceDataArgs, RolloutEngineArgs, TldrDataArgs, reward_model_data
from .rl import GRPOConfig, OnlineDPOConfig, PPOConfig, ReinforcePPConfig, RLOOConfig
from .supervised import DPOConfig, RMConfig, SFTConfig


@dataclass(frozen=True)
class EvaluateRMConfig:
    """Measure a reward model against humans and a judge: held-out accuracy, accuracy by annotator
    confidence (calibration), CNN/DM accuracy (out of distribution), agreement with GPT-3.5."""

    model: Annotated[str, arg(name="rm-path")] = "runs/rm/final"
    """Reward-model checkpoint (a run's final/). Its flag is --rm-path, as in every command that takes a
    reward model (--model is the old spelling, still accepted with a deprecation line); the key in a
    config file is `model`."""
    data: PreferenceDataArgs = field(default_factory=reward_model_data)
    """Held-out comparisons; replaced by the training run's own data settings (same split) when the
    model sits in a run folder with a config.json and `from_run` is set."""
    from_run: bool = True
    """Take `data` from the run folder's config.json so the held-out set is exactly the training run's."""
    cnndm: str = "openai/summarize_from_feedback"
    """CNN/DM comparisons: OpenAI JSON-lines file, or the hub dataset (its validation CNN/DM rows); empty = skip."""
    max_cnndm_query_length: int = 1919
    """CNN/DM query cap (N+ detail 6)."""
    policy_samples: str = str(SHARED / "data" / "tldr" / "policy_samples" / "openai_ppo_1.3b.jsonl")
    """JSON-lines of (query, policy response, reference, judge_preferred): does the reward model prefer
    the same summary as the judge? Empty = skip."""
    valid_limit: int = 0
    """Held-out TL;DR comparisons scored (0 = all)."""
    cnndm_limit: int = 0
    """CNN/DM comparisons scored (0 = all)."""
    judge_limit: int = 0
    """Judged policy samples scored (0 = all)."""
    batch_size: int = 16
    """Pairs per forward pass."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto = float32 on CPU, bfloat16 autocast on CUDA."""
    output: str = ""
    """Results JSON; empty = eval_rm.json in the run folder (or next to the model)."""
    num_threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    progress: bool = True
    """Progress bars."""


@dataclass(frozen=True)
class EvaluateConfig(RolloutEngineArgs):
    """Evaluate policies on held-out posts: ROUGE, reward-model score, win rate against the human
    reference (reward-model judge, optional LLM judge), length-controlled win rate, KL to SFT, length,
    EOS rate (N+ details 27-28)."""

    policies: tuple[str, ...] = ()
    """Policies as NAME=PATH (run folder final/, hub id or .gguf file), e.g. sft=runs/sft/final."""
    sft_path: str = ""
    """SFT policy the KL is measured against; empty = no KL."""
    rm_path: str = ""
    """Training reward model (scores and its own win rate); empty = no reward-model metrics."""
    judge_rm_path: str = ""
    """A different, stronger reward model judging win rates (exposes over-optimization of the training
    reward model); empty = the training reward model judges."""
    reward: str = ""
    """A reward scored on every summary and the reference (docs/rewards.md): a reward-model path, a
    built-in (rouge-l, rouge-1, rouge-2, length), a Python callable module:function, or a weighted sum
    TERM[:WEIGHT],... (e.g. rouge-l as the gold reward); empty = none."""
    best_of_n: int = 0
    """Best-of-n: sample this many summaries per post at `temperature` from each policy of
    `best_of_n_policies`, keep the one `best_of_n_reward` scores highest, and evaluate it as the policy
    NAME-boN, with its analytic KL log n - (n-1)/n to the policy it samples from; 0 = off."""
    best_of_n_reward: str = ""
    """The reward spec that picks the best of n (as `reward`); empty = `reward`, else `judge_rm_path`,
    else `rm_path`."""
    best_of_n_policies: tuple[str, ...] = ()
    """Names (from `policies`) that best-of-n samples from; empty = every policy."""
    data: TldrDataArgs = field(default_factory=TldrDataArgs)
    """Where the held-out posts come from: `valid`, else the posts of a local `train` file held out by
    id (the SFT split), else the hub dataset's validation split."""
    num_posts: int = 256
    """Held-out posts evaluated (0 = all)."""
    response_length: int = 63
    """Maximum new tokens per summary (53 Pythia / 63 Qwen2.5)."""
    greedy: bool = True
    """Greedy summaries; False = sampled at `temperature` (then the KL uses those samples)."""
    temperature: float = 0.7
    """Sampling temperature of the KL sample (and of the summaries when not greedy); the KL's log-probs
    use it too (N+ detail 21)."""
    kl: bool = True
    """Estimate KL(policy || SFT) from one extra sample per post (needs `sft_path`)."""
    batch_size: int = 16
    """Sequences per generation / forward pass."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto = float32 on CPU, bfloat16 autocast on CUDA."""
    judge: JudgeArgs = field(default_factory=JudgeArgs)
    output_dir: str = "runs/evaluate"
    """Folder for eval.json, summaries.jsonl, eval_table.md and policies/NAME.jsonl (each policy's
    summaries, written as soon as they exist; a rerun with the same checkpoint, posts and settings
    reuses them instead of generating again)."""
    seed: int = 42
    """Sampling seed (the same for every policy)."""
    num_threads: int = 0
    """torch CPU threads (0 = torch's default)."""


@dataclass(frozen=True)
class GoldConfig:
    """The gold-reward experiment (docs/gold.md): a known reward, ROUGE-L against the human reference,
    stands in for human judgement so that what each method does to it can be measured exactly.

    direct: from the SFT checkpoint, each of `methods` optimizes the gold reward on training posts for
    every seed of `seeds`; each run's policy is evaluated on held-out posts every `eval_every` updates
    (gold reward, KL to SFT, length, EOS rate).

    proxy (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"): pairs of summaries sampled
    from the SFT policy on `proxy_pairs` training posts, labelled by the gold reward, train a proxy reward
    model (`tldr-rlhf rm`); each of `proxy_methods` optimizes the proxy, and best-of-n of SFT picks by it;
    held-out proxy and gold reward are measured against KL to SFT."""

    sft_path: str = ""
    """SFT checkpoint every run starts from and the KL is measured to (the pipeline sets it)."""
    output_dir: str = "runs/gold"
    """Folder of the experiment: direct/ and proxy/ run folders, eval/ (one evaluation folder per run),
    proxy/pairs.jsonl, and gold.json (every held-out measurement, the report's input)."""
    data: TldrDataArgs = field(default_factory=TldrDataArgs)
    """Posts: the training side (RL prompts, proxy pairs) and the held-out side (every evaluation),
    split by post id as in SFT; the pipeline passes the SFT stage's data."""
    gold_reward: str = "rouge-l"
    """The gold reward spec (docs/rewards.md) the direct runs optimize, that labels the proxy pairs and
    that every evaluation measures."""
    methods: tuple[Literal["ppo", "grpo", "rloo", "online-dpo"], ...] = ("ppo", "grpo", "rloo", "online-dpo")
    """Methods of the direct experiment."""
    proxy_methods: tuple[Literal["ppo", "grpo", "rloo", "online-dpo"], ...] = ("ppo", "grpo")
    """Methods that optimize the proxy reward model."""
    seeds: tuple[int, ...] = (1, 2)
    """Seeds of every run (run order: all methods at the first seed, direct then proxy, then the next seed)."""
    single_seed_methods: tuple[Literal["ppo", "grpo", "rloo", "online-dpo"], ...] = ()
    """Methods of `methods` run at the first seed only (the budget's one-seed arms)."""
    variants: tuple[str, ...] = ()
    """Further direct runs at the first seed, each a method with settings changed: `NAME=METHOD;KEY=VALUE;...`,
    KEY `reward` (a reward spec; the run is also measured by it) or `no_eos_penalty` (a number or None),
    e.g. `rloo-no-eos-penalty=rloo;no_eos_penalty=None` (gold_arms.py)."""
    eval_every: int = 3
    """Updates between held-out evaluations of a run (its checkpoint cadence); the final policy is
    always evaluated (0 = only the final one)."""
    proxy_pairs: int = 128
    """Training posts the proxy pairs are sampled on (one pair each; tied pairs are left out)."""
    sft_resample_seeds: tuple[int, ...] = ()
    """Sampling seeds at which the SFT policy is measured again besides `evaluate.seed`: the spread of
    these measurements is what a policy identical to SFT shows on the held-out posts (the measurement's
    resolution), shown beside each gain in the report."""
    greedy_final: bool = False
    """Also measure the SFT policy and every direct run's final policy with greedy summaries (no sampling
    noise) on `greedy_posts` held-out posts, without KL, in one evaluation folder (eval/direct-greedy/);
    the report pairs each policy with SFT post by post (mean difference and its standard error)."""
    greedy_posts: int = 0
    """Held-out posts of the greedy measurement (0 = all of them)."""
    best_of_n: tuple[int, ...] = (2, 4, 8)
    """n of best-of-n of SFT picked by the proxy reward model (KL log n - (n-1)/n); () = none."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO's settings; reward, seed, paths, data and checkpoint cadence are set by the experiment."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """GRPO's settings (as ppo)."""
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    """RLOO's settings (as ppo)."""
    online_dpo: OnlineDPOConfig = field(default_factory=OnlineDPOConfig)
    """Online DPO's settings (as ppo)."""
    proxy_rm: RMConfig = field(default_factory=RMConfig)
    """The proxy reward model's training; its comparisons and output folder are set by the experiment."""
    proxy_no_eos_penalty: bool = True
    """Label the proxy pairs by the gold reward with the RL stages' no-EOS penalty (as the runs are trained);
    False = by the gold reward of the text alone (issue 26: the penalty swamped ROUGE-L in the labels)."""
    proxy_rm_from_sft: bool = True
    """Start the proxy reward model from the SFT checkpoint instead of `proxy_rm.model.path`."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Held-out evaluation settings (num_posts, response_length, temperature, greedy, batch_size); its
    policies, paths, rewards, data and output folder are set by the experiment."""
    num_threads: int = 0
    """torch CPU threads for every run (0 = each run's own setting)."""
    worker: str = ""
    """`I/N`: be worker I of N processes sharing the direct runs (run K of the run order, counted from 1,
    goes to worker ((K-1) mod N) + 1), e.g. two processes with `--num-threads 1` on two cores. A worker
    trains and measures its own runs only (worker 1 also measures SFT), and writes no gold.json: when every
    worker is done, run again without `--worker` for the proxy part, the greedy measurement and gold.json
    (finished runs and measurements are read back). Empty = one process does everything."""


@dataclass(frozen=True)
class ReportConfig:
    """Markdown + HTML report of a pipeline run folder: training curves, reward vs KL, win rate and
    ROUGE per stage, length distributions, and the side-by-side table of summaries."""

    run_dir: Positional[str]
    """Pipeline run folder (holds sft/, rm/, dpo/, ppo/, grpo/, evaluate/, pipeline.json)."""
    output_dir: str = ""
    """Where report.md, report.html and the PNGs go; empty = RUN_DIR/report."""
    table_posts: int = 4
    """Held-out posts in the side-by-side table of summaries."""


@dataclass(frozen=True)
class PipelineConfig:
    """SFT -> reward model -> {DPO, PPO, GRPO} -> evaluation -> report in one run folder. A stage whose
    output exists (final/, eval.json) is skipped, so re-running the command resumes after a crash; a
    stage stopped half-way resumes from its newest checkpoint. Each stage's flags are under its name
    (--sft.optim.lr 1e-4, --ppo.run.max-steps 5); output folders and the SFT / reward-model paths of
    later stages are set by the pipeline."""

    run_dir: str = "runs/pipeline"
    """Run folder: one subfolder per stage, pipeline.json (stage status and seconds), report/."""
    stages: tuple[str, ...] = DEFAULT_PIPELINE_STAGES
    """Stages to run, in pipeline order (also available: rloo, online-dpo, reinforce-pp, gold)."""
    rerun: tuple[str, ...] = ()
    """Stages to run again from scratch although their output exists (later stages are not redone)."""
    base_model: str = ""
    """The untrained policy evaluated as `base`; empty = the SFT stage's starting model."""
    rm_from_sft: bool = False
    """Start the reward model from the SFT checkpoint instead of `rm.model.path`."""
    num_threads: int = 0
    """torch CPU threads for every stage (0 = each stage's own setting)."""
    report_to: tuple[Literal["none", "tensorboard", "wandb", "trackio", "mlflow"], ...] = ()
    """Trackers for every training stage (each stage's own --STAGE.run.report-to when empty); each stage
    is one tracker run named after its folder."""
    table_posts: int = 4
    """Held-out posts in the report's side-by-side table."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    evaluate_rm: EvaluateRMConfig = field(default_factory=EvaluateRMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    online_dpo: OnlineDPOConfig = field(default_factory=OnlineDPOConfig)
    """Online DPO (the optional stage online-dpo): against the reward model, or against its own
    `reward` when set (then it needs no rm stage)."""
    reinforce_pp: ReinforcePPConfig = field(default_factory=ReinforcePPConfig)
    """REINFORCE++ (the optional stage reinforce-pp)."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Evaluation settings; its policies, paths, data (the SFT stage's held-out split) and output
    folder are set by the pipeline."""
    gold: GoldConfig = field(default_factory=GoldConfig)
    """The gold-reward experiment (the optional stage gold, docs/gold.md); its SFT checkpoint, data and
    output folder are set by the pipeline."""
