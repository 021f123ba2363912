"""Every ``tldr-rlhf`` command and its role in the pipeline, in one table (``STAGES``).

A row names the command, its help line, its config class, its presets and the function it runs, each as a
``"module:attribute"`` reference imported only when used: the training code pulls in torch (``tldr-rlhf
--help`` does not need it), and ``config.PipelineConfig`` takes its stage names from this table, so the
table cannot import the config classes. A pipeline stage also names the stages whose outputs it needs and
what marks it finished. ``cli`` (commands, usage), ``pipeline`` (order, inputs, outputs, functions),
``config.PipelineConfig`` (the default ``--stages``) and ``report`` (which run folders hold training
curves) all read it; a new stage is one row here, plus its config class, presets, function and its wiring
in ``pipeline.stage_configs``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

# Results files that mark an evaluation finished (the evaluations write them, the pipeline and the report read them)
EVAL_RM_FILE = "eval_rm.json"  # evaluate-rm's results, next to the reward model's final/
EVAL_FILE = "eval.json"  # evaluate's results in its output folder
GOLD_FILE = "gold.json"  # the gold experiment's held-out measurements, in its output folder
DPO_EVAL_FILE = "eval.json"  # DPO's held-out implicit-reward accuracy, in its run folder


def resolve(target: str) -> Any:
    """The object a ``"module:attribute"`` reference names, importing the module. Raises ImportError /
    AttributeError when either does not exist."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Stage:
    """One command of ``tldr-rlhf`` (one row of ``STAGES``)."""

    name: str
    """Command name, and the stage's subfolder of a pipeline run folder."""
    help: str
    """One line for ``tldr-rlhf --help``."""
    config: str
    """Its config class, "module:Class"."""
    entry: str
    """The function run with the parsed config, "module:function"."""
    presets: str = ""
    """Its presets by name, "module:TABLE" (the first is the default); empty = none."""
    pipeline: bool = False
    """A stage of ``tldr-rlhf pipeline``, run in table order."""
    optional: bool = False
    """A pipeline stage left out of the default ``--stages`` (run when named)."""
    inputs: tuple[str, ...] = ()
    """Pipeline stages whose outputs it needs."""
    inputs_when: tuple[tuple[str, str], ...] = ()
    """(PipelineConfig flag, stage): a further input while the flag is set."""
    output: str = ""
    """The results file that marks an evaluation finished, relative to the pipeline run folder (a
    training stage is finished when its final/ is complete; the report is always rebuilt)."""
    train: bool = False
    """Trains a model: RUN_DIR/<name>/ is a run folder with metrics.jsonl and final/."""
    policy: bool = False
    """Trains a policy from the SFT one; the pipeline evaluates it beside SFT."""
    family: str = ""
    """What kind of stage it is, the test every other module uses instead of listing stage names:
    "supervised" (trains from a base model on fixed targets: sft, rm), "preference" (a policy from
    fixed preference pairs: dpo), "rl" (a policy from its own samples scored by a reward: ppo, grpo,
    ...), "evaluation" (measures, trains nothing it keeps); "" for the utility commands."""
    title: str = ""
    """What its final/ holds, the model card's title ("PPO-trained TL;DR policy"; TL;DR becomes the task)."""
    citations: tuple[str, ...] = ()
    """BibTeX entries of the papers the model card cites besides the two every card cites
    (``cards.BIBTEX``)."""
    card_metrics: tuple[tuple[str, str], ...] = ()
    """(metrics.jsonl key, what the model card calls it): the card's "Metrics of the run" table."""
    card_settings: tuple[str, ...] = ()
    """Top-level config fields the model card's "Settings" table shows (before the optimizer's)."""
    curves: tuple[str, ...] = ()
    """metrics.jsonl keys the report plots as this stage's training curves, in order."""
    plan_kind: str = ""
    """How ``plan`` estimates its memory: "sequences" (a causal LM on query + response, logits kept:
    sft), "pairs" (a scorer on chosen/rejected pairs: rm), "preference" (a policy on pairs, reference
    log-probs cached: dpo), "actor-critic" (policy + value model + rollout: ppo), "group" (a policy
    + rollout of groups of samples per prompt: grpo, rloo, online-dpo)."""

    def config_class(self) -> type:
        """The config dataclass the command's flags fill."""
        return resolve(self.config)

    def preset_table(self) -> dict[str, Any]:
        """Presets by name ({} when the command has none)."""
        return resolve(self.presets) if self.presets else {}

    def function(self) -> Callable[[Any], Any]:
        """The function that runs the stage (imports its module)."""
        return resolve(self.entry)

    def needs(self, pipeline_cfg: Any) -> tuple[str, ...]:
        """The stages whose outputs this one needs under a PipelineConfig (its flags add inputs). An RL
        stage whose own section sets ``reward`` (``reward/specs.py``: ROUGE-L, a function, ...) does not need
        the reward-model stage."""
        deps = self.inputs + tuple(stage for flag, stage in self.inputs_when if getattr(pipeline_cfg, flag))
        section = getattr(pipeline_cfg, self.name.replace("-", "_"), None)
        if "rm" in deps and getattr(section, "reward", ""):
            deps = tuple(d for d in deps if d != "rm")
        return deps


_RL_INPUTS = ("sft", "rm")
# BibTeX entries the model cards cite (each row's ``citations``)
_RAFAILOV2023DIRECT = """@inproceedings{rafailov2023direct,
  title={Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author={Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Ermon, Stefano and Manning, Christopher D. and Finn, Chelsea},
  booktitle={NeurIPS},
  year={2023}
}"""
_SCHULMAN2017PROXIMAL = """@article{schulman2017proximal,
  title={Proximal Policy Optimization Algorithms},
  author={Schulman, John and Wolski, Filip and Dhariwal, Prafulla and Radford, Alec and Klimov, Oleg},
  journal={arXiv preprint arXiv:1707.06347},
  year={2017}
}"""
_SHAO2024DEEPSEEKMATH = """@article{shao2024deepseekmath,
  title={DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models},
  author={Shao, Zhihong and Wang, Peiyi and Zhu, Qihao and Xu, Runxin and Song, Junxiao and Zhang, Mingchuan and Li, Y. K. and Wu, Y. and Guo, Daya},
  journal={arXiv preprint arXiv:2402.03300},
  year={2024}
}"""
_GUO2024DIRECT = """@article{guo2024direct,
  title={Direct Language Model Alignment from Online AI Feedback},
  author={Guo, Shangmin and Zhang, Biao and Liu, Tianlin and Liu, Tianqi and Khalman, Misha and Llinares, Felipe and Rame, Alexandre and Mesnard, Thomas and Zhao, Yao and Piot, Bilal and Ferret, Johan and Blondel, Mathieu},
  journal={arXiv preprint arXiv:2402.04792},
  year={2024}
}"""
_HU2025REINFORCE = """@article{hu2025reinforce,
  title={REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models},
  author={Hu, Jian},
  journal={arXiv preprint arXiv:2501.03262},
  year={2025}
}"""
_AHMADIAN2024BACK = """@inproceedings{ahmadian2024back,
  title={Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs},
  author={Ahmadian, Arash and Cremer, Chris and Gall{\\'e}, Matthias and Fadaee, Marzieh and Kreutzer, Julia and Pietquin, Olivier and {\\"U}st{\\"u}n, Ahmet and Hooker, Sara},
  booktitle={ACL},
  year={2024}
}"""
_BASE_SETTINGS = ("epochs", "micro_batch_size", "gradient_accumulation_steps")
_RL_SETTINGS = ("total_episodes", "group_size", "kl_coef", "response_length", "temperature")
_RL_METRICS = (("objective/scores", "reward-model score (last update)"), ("objective/kl", "KL to the reference (last update)"))
_LENGTH = ("objective/response_length", "response length (tokens)")
_RL_CURVES = ("objective/scores", "objective/kl", "loss/policy", "objective/response_length")

STAGES: tuple[Stage, ...] = (
    Stage(
        "sft", "supervised fine-tuning on reference TL;DRs",
        "tldr_rlhf.config:SFTConfig", "tldr_rlhf.train.sft:train", "tldr_rlhf.presets:SFT_PRESETS",
        pipeline=True, train=True,
        family="supervised", title="supervised fine-tuned TL;DR policy",
        card_metrics=(("loss/sft", "training loss (last step)"), ("valid/loss", "validation loss")),
        card_settings=(*_BASE_SETTINGS, "loss_on_query"), curves=("loss/sft", "valid/loss"), plan_kind="sequences",
    ),
    Stage(
        "rm", "reward model on human comparisons, normalized on SFT references",
        "tldr_rlhf.config:RMConfig", "tldr_rlhf.train.rm:train", "tldr_rlhf.presets:RM_PRESETS",
        pipeline=True, inputs_when=(("rm_from_sft", "sft"),), train=True,
        family="supervised", title="TL;DR reward model",
        card_metrics=(("loss/rm", "training loss (last step)"), ("rm/accuracy", "training accuracy (last step)"), ("valid/accuracy", "held-out accuracy")),
        card_settings=_BASE_SETTINGS, curves=("loss/rm", "rm/accuracy", "valid/accuracy"), plan_kind="pairs",
    ),
    Stage(
        "evaluate-rm", "reward-model accuracy (held-out, by confidence, CNN/DM) and judge agreement",
        "tldr_rlhf.config:EvaluateRMConfig", "tldr_rlhf.evaluate_rm:evaluate", "tldr_rlhf.presets:EVALUATE_RM_PRESETS",
        pipeline=True, inputs=("rm",), output=f"rm/{EVAL_RM_FILE}",
        family="evaluation",
    ),
    Stage(
        "dpo", "direct preference optimization from an SFT policy (DPO / cDPO / IPO)",
        "tldr_rlhf.config:DPOConfig", "tldr_rlhf.train.dpo:train", "tldr_rlhf.presets:DPO_PRESETS",
        pipeline=True, inputs=("sft",), train=True, policy=True,
        family="preference", title="DPO-trained TL;DR policy", citations=(_RAFAILOV2023DIRECT,),
        card_metrics=(("loss/dpo", "training loss (last step)"), ("rewards/accuracy", "implicit-reward accuracy (last step)"), ("valid/implicit_reward_accuracy", "held-out implicit-reward accuracy")),
        card_settings=("loss_type", "beta", "label_smoothing", "epochs"),
        curves=("loss/dpo", "rewards/accuracy", "rewards/margin", "valid/implicit_reward_accuracy"), plan_kind="preference",
    ),
    Stage(
        "ppo", "PPO from an SFT policy against a reward model (N+ details 16-23)",
        "tldr_rlhf.config:PPOConfig", "tldr_rlhf.train.ppo:train", "tldr_rlhf.presets:PPO_PRESETS",
        pipeline=True, inputs=_RL_INPUTS, train=True, policy=True,
        family="rl", title="PPO-trained TL;DR policy", citations=(_SCHULMAN2017PROXIMAL,),
        card_metrics=(*_RL_METRICS, ("objective/rlhf_reward", "score - KL penalty (last update)"), _LENGTH),
        card_settings=("total_episodes", "kl_coef", "response_length", "temperature", "ppo_epochs", "num_mini_batches", "gamma", "lam"),
        curves=("objective/scores", "objective/kl", "objective/rlhf_reward", "loss/policy", "loss/value", "objective/response_length"), plan_kind="actor-critic",
    ),
    Stage(
        "grpo", "GRPO / Dr. GRPO from an SFT policy against a reward model (N+ details 24-25)",
        "tldr_rlhf.config:GRPOConfig", "tldr_rlhf.train.grpo:train", "tldr_rlhf.presets:GRPO_PRESETS",
        pipeline=True, inputs=_RL_INPUTS, train=True, policy=True,
        family="rl", title="GRPO-trained TL;DR policy", citations=(_SHAO2024DEEPSEEKMATH,),
        card_metrics=(*_RL_METRICS, _LENGTH), card_settings=(*_RL_SETTINGS, "loss_type"), curves=_RL_CURVES, plan_kind="group",
    ),
    Stage(
        "rloo", "RLOO (REINFORCE leave-one-out) from an SFT policy against a reward model",
        "tldr_rlhf.config:RLOOConfig", "tldr_rlhf.train.rloo:train", "tldr_rlhf.presets:RLOO_PRESETS",
        pipeline=True, optional=True, inputs=_RL_INPUTS, train=True, policy=True,
        family="rl", title="RLOO-trained TL;DR policy", citations=(_AHMADIAN2024BACK,),
        card_metrics=(*_RL_METRICS, _LENGTH), card_settings=_RL_SETTINGS, curves=_RL_CURVES, plan_kind="group",
    ),
    Stage(
        "online-dpo", "online DPO: pairs sampled from the policy, labelled by a reward (--reward / --rm-path), DPO against the SFT reference",
        "tldr_rlhf.config:OnlineDPOConfig", "tldr_rlhf.train.online_dpo:train", "tldr_rlhf.presets:ONLINE_DPO_PRESETS",
        pipeline=True, optional=True, inputs=_RL_INPUTS, train=True, policy=True,
        family="rl", title="online-DPO-trained TL;DR policy", citations=(_RAFAILOV2023DIRECT, _GUO2024DIRECT),
        card_metrics=(("objective/scores", "reward (last update)"), ("objective/kl", "KL to the reference (last update)"), ("loss/policy", "DPO loss (last update)")),
        card_settings=("total_episodes", "beta", "loss_type", "kl_coef", "response_length", "temperature"),
        curves=("objective/scores", "objective/kl", "loss/policy", "online_dpo/tied_pairs", "online_dpo/reward_margin", "objective/response_length"), plan_kind="group",
    ),
    Stage(
        "reinforce-pp", "REINFORCE++: per-token KL-penalized returns whitened over the batch, PPO's clipped loss, no critic",
        "tldr_rlhf.config.rl:ReinforcePPConfig", "tldr_rlhf.train.reinforce_pp:train", "tldr_rlhf.presets:REINFORCE_PP_PRESETS",
        pipeline=True, optional=True, inputs=_RL_INPUTS, train=True, policy=True,
        family="rl", title="REINFORCE++-trained TL;DR policy", citations=(_HU2025REINFORCE,),
        card_metrics=(*_RL_METRICS, _LENGTH), card_settings=(*_RL_SETTINGS, "gamma", "clip_range"), curves=_RL_CURVES, plan_kind="group",
    ),
    Stage("generate", "summarize posts with a checkpoint", "tldr_rlhf.cli:GenerateArgs", "tldr_rlhf.cli:run_generate"),
    Stage("stats", "token-length statistics of queries and responses", "tldr_rlhf.cli:StatsArgs", "tldr_rlhf.cli:run_stats"),
    Stage(
        "export-rm", "a reward model as a stock <Arch>ForSequenceClassification (no remote code): tldr-rlhf export-rm RUN/final OUT",
        "tldr_rlhf.export:ExportRMArgs", "tldr_rlhf.export:export_reward_model",
    ),
    Stage(
        "plan", "estimated peak memory per device of each stage (weights, gradients, optimizer, activations, KV cache, frozen models) and what makes it fit",
        "tldr_rlhf.plan:PlanArgs", "tldr_rlhf.plan:plan",
    ),
    Stage(
        "inspect", "each policy's summary token by token, coloured by log-prob or KL to a reference, with RM scores (--html)",
        "tldr_rlhf.inspection:InspectConfig", "tldr_rlhf.inspection:inspect",
    ),
    Stage(
        "push", "upload a run's final/ (with its model card) to the Hugging Face Hub: tldr-rlhf push RUN REPO_ID",
        "tldr_rlhf.cards:PushArgs", "tldr_rlhf.cards:push",
    ),
    Stage(
        "evaluate", "ROUGE, RM score, win rate (+ length-controlled) vs the reference, KL to SFT, length, EOS rate",
        "tldr_rlhf.config:EvaluateConfig", "tldr_rlhf.evaluate:evaluate", "tldr_rlhf.presets:EVALUATE_PRESETS",
        pipeline=True, inputs=("sft",), output=f"evaluate/{EVAL_FILE}",
        family="evaluation",
    ),
    Stage(
        "gold", "the gold-reward experiment: PPO / GRPO / RLOO / online DPO on ROUGE-L, and a proxy RM trained on gold labels, measured on held-out posts (docs/gold.md)",
        "tldr_rlhf.config:GoldConfig", "tldr_rlhf.gold:run", "tldr_rlhf.presets:GOLD_PRESETS",
        pipeline=True, optional=True, inputs=("sft",), output=f"gold/{GOLD_FILE}",
        family="evaluation",
    ),
    Stage(
        "report", "Markdown + HTML report with plots of a pipeline or single-stage run folder: tldr-rlhf report RUN_DIR",
        "tldr_rlhf.config:ReportConfig", "tldr_rlhf.report:build_report",
        pipeline=True,
    ),
    Stage(
        "pipeline", "SFT -> RM -> {DPO, PPO, GRPO} -> evaluate -> report in one resumable run folder",
        "tldr_rlhf.config:PipelineConfig", "tldr_rlhf.pipeline:main", "tldr_rlhf.presets:PIPELINE_PRESETS",
    ),
)

COMMANDS: dict[str, Stage] = {s.name: s for s in STAGES}
PIPELINE_STAGES = tuple(s.name for s in STAGES if s.pipeline)  # in pipeline order
DEFAULT_PIPELINE_STAGES = tuple(s.name for s in STAGES if s.pipeline and not s.optional)
TRAIN_STAGES = tuple(s.name for s in STAGES if s.train)
POLICY_STAGES = tuple(s.name for s in STAGES if s.policy)
RL_STAGES = tuple(s.name for s in STAGES if s.family == "rl")  # policies trained on their own samples against a reward
