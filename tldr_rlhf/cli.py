"""``tldr-rlhf`` command line: one subcommand per stage, presets by name, tyro for the flags.

    tldr-rlhf sft --preset cpu-smol [--optim.lr 1e-4 ...]
    tldr-rlhf generate --model runs/sft-cpu-smol/final --posts posts.jsonl --limit 4
    tldr-rlhf stats --tokenizer Qwen/Qwen2.5-0.5B --posts posts.jsonl

``--preset NAME`` picks the defaults; any flag after it overrides one field. ``--task ultrafeedback``
(short for ``--data.task``) trains a stage on UltraFeedback instead of TL;DR; the ``uf-cpu-smol``
presets set it with local data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import re
import sys
from dataclasses import dataclass
from typing import Any

from .config.parts import RolloutEngineArgs
from .errors import TldrRlhfError
from .stages import COMMANDS, STAGES


@dataclass(frozen=True, kw_only=True)
class GenerateArgs(RolloutEngineArgs):
    """Summarize posts with a checkpoint."""

    model: str
    """Checkpoint: run folder's final/ or checkpoints/step-N/, hub id, or .gguf file."""
    posts: str = ""
    """JSON-lines posts (OpenAI tldr_3_filtered fields; summary optional)."""
    post: str = ""
    """One post's text (instead of --posts)."""
    title: str = ""
    """Title of --post."""
    subreddit: str = "AskReddit"
    """Subreddit of --post."""
    instruction: str = ""
    """One instruction to answer instead (UltraFeedback task format: the tokenizer's chat template, else
    the plain "### Instruction:" template)."""
    tokenizer: str = ""
    """Tokenizer (default: the model's)."""
    limit: int = 8
    """Posts to summarize from --posts (0 = all)."""
    greedy: bool = False
    """Greedy decoding instead of sampling."""
    temperature: float = 0.7
    """Sampling temperature (N+ default 0.7)."""
    response_length: int = 63
    """Maximum new tokens per summary, as in every command (--max-new-tokens is the old spelling, still
    accepted with a deprecation line)."""
    max_query_length: int = 512
    """Query token cap (smart truncation)."""
    batch_size: int = 8
    """Posts per generation batch (left-padded)."""
    seed: int = 42
    """Sampling seed."""
    output: str = ""
    """Also write {id, summary, reference} JSON lines here."""
    num_threads: int = 0
    """torch CPU threads (0 = torch's default)."""


@dataclass(frozen=True)
class StatsArgs:
    """Token-length statistics of formatted queries and responses."""

    posts: str
    """JSON-lines posts file, folder with {split}.jsonl, or hub dataset id."""
    tokenizer: str
    """Tokenizer path or hub id."""
    split: str = "train"
    """Split (hub datasets / folders)."""
    max_query_length: int = 512
    """Query token cap (smart truncation)."""


def run_generate(args: GenerateArgs) -> list[dict[str, Any]]:
    """Implementation of ``tldr-rlhf generate``; returns the printed records."""
    import torch

    # lazy: `tldr-rlhf --help` and every command's --help load without torch and transformers
    from .data.tldr import Post, format_query, load_posts
    from .data.ultrafeedback import prompt_ids
    from .generation import decode_response, generate
    from .modeling import load_causal_lm, load_tokenizer
    from .checkpoints import require_kind
    from .progress import progress
    from .rollout_engine import check_engine_available, engine_for

    check_engine_available(args.rollout_engine)  # --rollout-engine vllm without vllm: the install line, before anything loads
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if sum(map(bool, (args.posts, args.post, args.instruction))) != 1:
        raise TldrRlhfError("give exactly one of --posts FILE, --post TEXT or --instruction TEXT")
    require_kind(args.model, "policy", "--model")  # a reward model's final/ is refused before anything loads
    if args.posts:
        posts = load_posts(args.posts, "validation", need_summary=False, limit=args.limit or None)
    else:
        posts = [Post("instruction", "", "", args.instruction) if args.instruction else Post("post", args.subreddit, args.title, args.post)]
    tok = load_tokenizer(args.tokenizer or args.model)
    model = load_causal_lm(args.model, tokenizer=tok)
    torch.manual_seed(args.seed)
    if args.instruction:
        queries = [prompt_ids(tok, args.instruction)]
    else:
        queries = [format_query(tok, p.subreddit, p.title, p.post, args.max_query_length)[1] for p in posts]
    kw = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=args.response_length, temperature=args.temperature, greedy=args.greedy, batch_size=args.batch_size)
    with progress(len(queries), "generating", unit="post", enabled=bool(args.posts)) as bar:  # a posts file: an ETA
        if args.rollout_engine == "hf":
            responses = generate(model, queries, on_batch=bar.update, **kw)
        else:  # --rollout-engine vllm: an engine on a copy of the model's weights, request i seeded with seed + i
            engine = engine_for(args, model, max_tokens=max(map(len, queries)) + args.response_length, seed=args.seed, sequences=len(queries))
            responses = engine.generate(model, queries, seed=args.seed, **kw)
            engine.close()
            bar.update(len(queries))  # the engine schedules every request at once
    records = [{"id": p.id, "title": p.title, "summary": decode_response(tok, r), "reference": p.summary.strip()} for p, r in zip(posts, responses)]
    for r in records:
        print(f"[{r['id']}] {r['title']}\n  summary:   {r['summary']}" + (f"\n  reference: {r['reference']}" if r["reference"] else ""))
    if args.output:
        with open(args.output, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return records


def run_stats(args: StatsArgs) -> dict[str, Any]:
    # lazy: `tldr-rlhf --help` and every command's --help load without torch and transformers
    from .data.tldr import load_posts, token_length_report
    from .modeling import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    report = token_length_report(load_posts(args.posts, args.split, need_summary=False), tok, max_query_length=args.max_query_length)
    print(json.dumps(report, indent=2))
    return report


def _usage() -> str:
    lines = ["usage: tldr-rlhf COMMAND [--preset NAME] [--config FILE] [flags]   (tldr-rlhf COMMAND --help for flags)", "", "commands:"]
    width = max(len(stage.name) for stage in STAGES)
    for stage in STAGES:
        presets = stage.preset_table()
        lines.append(f"  {stage.name:<{width}} {stage.help}" + (f"  [presets: {', '.join(presets)}]" if presets else ""))
    lines += ["", "--config FILE: a YAML recipe (recipes/) or a run's config.json; flags after it override its fields.",
              "tldr-rlhf --version: the versions of tldr-rlhf, torch and transformers."]
    return "\n".join(lines)


def version_lines() -> list[str]:
    """``tldr-rlhf X.Y.Z``, ``torch X.Y.Z``, ``transformers X.Y.Z``: the installed distributions' versions
    (read from their metadata: torch is not imported), "not installed" for a missing one."""
    from importlib import metadata

    # lazy: `tldr-rlhf --help` and every command's --help load without torch and transformers
    from . import __version__

    lines = []
    for dist, fallback in (("tldr-rlhf", __version__), ("torch", None), ("transformers", None)):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = fallback or "not installed"
        lines.append(f"{dist} {version}")
    return lines


# short flag -> the config section it belongs to (``--task`` is ``--data.task``; ``--num-threads``, the
# spelling of the commands without a run folder, is ``--run.num-threads``)
SHORT_FLAGS = {"--task": "data", "--report-to": "run", "--push-to-hub": "run", "--num-threads": "run"}
# config class -> {old flag: new flag}: one spelling across commands for the reward-model path (--rm-path)
# and the response length cap (--response-length); the old one still works and prints one deprecation
# line. A config that nests one of these classes takes the old flag under its section (the pipeline's
# --evaluate-rm.model, --dpo.sample-max-new-tokens): ``renamed_flags``.
RENAMED_FLAGS = {
    "EvaluateRMConfig": {"--model": "--rm-path"},
    "DPOConfig": {"--sample-max-new-tokens": "--sample-response-length"},
    "GenerateArgs": {"--max-new-tokens": "--response-length"},
}


def renamed_flags(cls: type, prefix: str = "--") -> dict[str, str]:
    """{old flag: new flag} of config class ``cls`` (``RENAMED_FLAGS``) and of every config section it
    nests, each under its section's flag prefix (``--evaluate-rm.``)."""
    import typing

    out = {prefix + old[2:]: prefix + new[2:] for old, new in RENAMED_FLAGS.get(cls.__name__, {}).items()}
    if not dataclasses.is_dataclass(cls):
        return out
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: no nested sections to look at
        return out
    for f in dataclasses.fields(cls):
        sub = hints.get(f.name)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            out.update(renamed_flags(sub, f"{prefix}{f.name.replace('_', '-')}."))
    return out


def _renamed(command: str, cls: type, rest: list[str]) -> list[str]:
    """``rest`` with each old flag of ``command``'s config class ``cls`` (``renamed_flags``, also in its
    ``--flag=VALUE`` form) replaced by its new spelling, printing one deprecation line to stderr per old flag."""
    renamed = renamed_flags(cls)
    out = []
    for arg in rest:
        flag, sep, value = arg.partition("=")
        new = renamed.get(flag)
        if new:
            print(f"tldr-rlhf {command}: {flag} is deprecated, use {new} (the same flag in every command)", file=sys.stderr)
            arg = new + sep + value
        out.append(arg)
    return out


def _expand_short(arg: str, short: str, section: str) -> str:
    """``--report-to`` -> ``--run.report-to`` (also in its ``--flag=VALUE`` form); other args unchanged."""
    long = f"--{section}.{short[2:]}"
    if arg == short:
        return long
    return long + arg[len(short):] if arg.startswith(short + "=") else arg


def _take_option(rest: list[str], flag: str) -> str | None:
    """Remove ``flag VALUE`` / ``flag=VALUE`` (its first occurrence) from ``rest``; its value, None when absent."""
    for i, arg in enumerate(rest):
        if arg == flag or arg.startswith(flag + "="):
            value = arg.split("=", 1)[1] if "=" in arg else (rest[i + 1] if i + 1 < len(rest) else "")
            del rest[i : i + (1 if "=" in arg else 2)]
            return value
    return None


def pipeline_help(tyro_help: str) -> str:
    """Short ``tldr-rlhf pipeline --help``: tyro's help of the pipeline's own fields (its text up to the
    first stage's section) and one line per stage naming the prefix of its flags and the command whose
    ``--help`` lists them. ``--help-all`` prints every stage's flags instead."""
    # lazy: `tldr-rlhf --help` and every command's --help load without torch and transformers
    from .config import PipelineConfig

    first = re.search(r"^\W*sft options\b", tyro_help, flags=re.M)  # boxed (terminal) or plain section title
    head = "\n".join(line.rstrip() for line in tyro_help[: first.start() if first else len(tyro_help)].rstrip().splitlines())
    lines = [head, "", "Each stage's flags, under its name (every field of the stage's own command):"]
    for f in dataclasses.fields(PipelineConfig):
        flag = f.name.replace("_", "-")
        if flag in COMMANDS:
            lines.append(f"  --{flag}.FIELD ...".ljust(26) + f"{COMMANDS[flag].help}  (tldr-rlhf {flag} --help lists them)")
    lines += ["", "e.g. --sft.optim.lr 1e-4 --ppo.run.max-steps 5; tldr-rlhf pipeline --help-all prints every stage's flags."]
    return "\n".join(lines)


def parse(argv: list[str]):
    """Parse ``argv`` (without the program name) into (function, config): the command's row of
    ``stages.STAGES``, its preset (``--preset NAME``, else the first), the fields of ``--config FILE``
    (YAML or a run's config.json; several are applied in order) on top of it, and the flags on top. Raises SystemExit 2 for
    an unknown command or preset (0 for ``--help`` / ``--version``, printed to stdout), ConfigError for
    a config file that cannot be read or names an unknown field."""
    import tyro

    if argv and argv[0] in ("-V", "--version"):
        print("\n".join(version_lines()))
        raise SystemExit(0)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        if argv:
            print(f"tldr-rlhf: unknown command '{argv[0]}'\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        raise SystemExit(2)
    name, rest = argv[0], list(argv[1:])
    stage = COMMANDS[name]
    cls, presets = stage.config_class(), stage.preset_table()
    fields = getattr(cls, "__dataclass_fields__", {})
    default = None
    # --preset NAME picks the command's defaults, unless the command has a field of that name (plan)
    preset = _take_option(rest, "--preset") if presets or "preset" not in fields else None
    if preset is not None:
        if preset not in presets:
            print(f"tldr-rlhf {name}: unknown preset '{preset}'; choose from {sorted(presets)}", file=sys.stderr)
            raise SystemExit(2)
        default = presets[preset]
    if default is None and presets:
        default = next(iter(presets.values()))
    while (config_file := _take_option(rest, "--config")) is not None:  # several: applied in order
        from .config.files import config_from_file

        default = config_from_file(cls, config_file, default)
    rest = _renamed(name, cls, rest)
    for short, section in SHORT_FLAGS.items():  # --task X: short for --data.task X; --report-to: --run.report-to
        if section in fields and short.lstrip("-").replace("-", "_") not in fields:
            rest = [_expand_short(a, short, section) for a in rest]
    description = (cls.__doc__ or "") + (f"\nPresets (--preset NAME): {', '.join(presets)}; the first is the default." if presets else "")
    description += "\n--config FILE: a YAML recipe or a run's config.json on top of the preset; flags override it."
    if name == "pipeline" and "--help-all" in rest:
        rest = [("--help" if a == "--help-all" else a) for a in rest]
    elif name == "pipeline" and any(a in ("-h", "--help") for a in rest):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                tyro.cli(cls, args=["--help"], default=default, prog=f"tldr-rlhf {name}", description=description)
            except SystemExit:
                pass
        print(pipeline_help(out.getvalue()))
        raise SystemExit(0)
    cfg = tyro.cli(cls, args=rest, default=default, prog=f"tldr-rlhf {name}", description=description)
    return (lambda c: stage.function()(c)), cfg  # the stage's module (torch and all) is imported when it runs


def _failure_line(e: BaseException) -> tuple[str, int] | None:
    """The one line and exit code ``main`` ends with for an expected failure; None for a bug (the
    traceback is shown)."""
    # lazy: `tldr-rlhf --help` and every command's --help load without torch and transformers
    from .opened_runs import resume_hint

    if isinstance(e, TldrRlhfError):
        return f"tldr-rlhf: error: {e}", 2
    if isinstance(e, KeyboardInterrupt):
        return f"\ntldr-rlhf: interrupted{resume_hint()}", 130
    if isinstance(e, OSError):  # a full disk, a folder that vanished: the run can be resumed
        return f"tldr-rlhf: error: {e}{resume_hint()} (--debug shows the traceback)", 1
    os_error = _safetensors_os_error(e)
    if os_error:  # the same, met by safetensors' writer, which reports it as its own error type
        return f"tldr-rlhf: error: {os_error} (writing safetensors weights){resume_hint()} (--debug shows the traceback)", 1
    return None


def _safetensors_os_error(e: BaseException) -> str | None:
    """``[Errno 28] No space left on device`` for a safetensors ``SafetensorError`` that wraps an OS
    error ("Error while serializing: I/O error: No space left on device (os error 28)"); None for any
    other exception."""
    if type(e).__name__ != "SafetensorError":
        return None
    found = re.search(r"I/O error: (.*) \(os error (\d+)\)", str(e))
    return f"[Errno {found.group(2)}] {found.group(1)}" if found else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tldr-rlhf``. Exit codes: 0 done, 2 a user error (one line naming the flag,
    file, line or field; ``--debug`` adds the traceback), 1 an OS error such as a full disk (one line
    and where to resume) or a failed ``--run.push-to-hub`` upload of a run that is saved (one line
    each, with the command that retries it), 130 interrupted by Ctrl-C (one line and where to resume)."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TLDR_RLHF_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        fn, cfg = parse(argv)
    except TldrRlhfError as e:  # a --config file that cannot be read or names an unknown field
        if debug:
            raise
        print(_failure_line(e)[0], file=sys.stderr)
        return 2
    from tqdm.contrib.logging import logging_redirect_tqdm

    # lazy: `tldr-rlhf --help` and every command's --help load without torch and transformers
    from .opened_runs import close_opened_runs, forget_opened_runs, push_failures, restore_replaced_runs

    forget_opened_runs()  # the run folders of this invocation only
    try:
        from .validation import validate_config

        # a pipeline's stage inputs come from its earlier stages: each stage checks its paths when it starts
        validate_config(cfg, check_paths=type(cfg).__name__ != "PipelineConfig")
        with logging_redirect_tqdm():  # per-step log lines print above the progress bar, not through it
            fn(cfg)
        if push_failures():  # every run is saved; the upload the user asked for did not happen
            for line in push_failures():
                print(f"tldr-rlhf: error: {line}", file=sys.stderr)
            return 1
    except BaseException as e:
        restore_replaced_runs()
        failure = _failure_line(e)
        if debug or failure is None:
            raise
        print(failure[0], file=sys.stderr)
        return failure[1]
    finally:
        close_opened_runs()  # tracker runs end with the command, finished or not
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
