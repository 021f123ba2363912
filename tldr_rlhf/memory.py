"""How much memory each training stage needs per device, before anything loads: the estimate that the
``plan`` command prints (``plan.py``) and that every training stage checks first (``preflight``).

For every training stage of a pipeline preset (or one stage's config) the estimate is split into

* **weights**: the trained model's master weights (float32 when the stage trains in mixed precision or
  float32; LoRA: the base in its load dtype plus the adapters);
* **gradients** and **optimizer**: float32 gradients of the trainable parameters and AdamW's two states
  (8 bytes per parameter; 2 with 8-bit AdamW, bitsandbytes on CUDA);
* **activations**: what the forward keeps for the backward of one micro-batch, per token and layer
  ``A = 10 H + 4 I + 4 kv_dim`` elements (the SwiGLU decoder layer of Qwen2 / Llama with a fused
  attention kernel: norms, q/k/v, attention output, gate, up, their product), at the compute precision
  (bfloat16 under autocast, else float32); plus the response logits where a stage materializes them
  (SFT: ``micro x T x V`` float32 twice, logits and log-softmax);
* **KV cache**: generation in the RL stages, ``2 L kv_dim (P + T)`` elements per sequence;
* **frozen**: the reference policy and the reward model the RL stages keep loaded, in float32 (they run
  under the policy's autocast so that the first KL is exactly 0); under LoRA the reference is the
  policy with its adapters off and costs nothing (PPO's value model is trained: it counts as weights,
  gradients and optimizer);
* **overhead**: the runtime itself (CUDA context and allocator slack on a GPU; on the CPU the
  interpreter, torch, transformers and the tokenizer), a constant.

On the CPU the estimate is compared with the measured peak resident memory of each stage in
``benchmarks/bench_plan.py``. The model shapes come from the checkpoint's ``config.json`` (a folder,
a hub id in the local cache, a reward model's ``text_config``), a ``.gguf`` file's metadata, or, for the
reference setup's hub models without network, a table of their published configs.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .engine_memory import stage_engine_bytes
from .errors import ConfigError
from .stages import COMMANDS, TRAIN_STAGES

GIB = 2**30


@dataclass(frozen=True)
class MemoryShape:
    """What memory depends on in a decoder-only model. ``params`` counts every weight once (tied
    embeddings once). Not ``flops.ModelShape``, what the FLOP count needs of a loaded model."""

    params: int
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = True

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def params_from_config(vocab: int, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, *, tied: bool, qkv_bias: bool) -> int:
    """Weights of a Qwen2 / Llama decoder: embedding V H (+ an untied LM head V H), per layer the q, k,
    v, o projections (q/k/v biases for Qwen2), the SwiGLU MLP 3 H I and two RMSNorm vectors, and the
    final norm. Qwen2.5-0.5B: 494,032,768."""
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = hidden * q + 2 * hidden * kv + q * hidden + ((q + 2 * kv) if qkv_bias else 0)
    per_layer = attn + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


def shape_from_config(cfg: dict[str, Any]) -> MemoryShape:
    """A MemoryShape from a Hugging Face config.json dict (a reward model's ``text_config`` inside)."""
    cfg = cfg.get("text_config") or cfg
    try:
        h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        hd = cfg.get("head_dim") or h // heads
        kv = cfg.get("num_key_value_heads") or heads
        tied = bool(cfg.get("tie_word_embeddings", True))
        args = (cfg["vocab_size"], h, cfg["num_hidden_layers"], cfg["intermediate_size"], heads, kv, hd)
    except KeyError as e:
        raise ConfigError(f"config has no {e.args[0]}: not a decoder-only transformer this plan knows") from None
    return MemoryShape(params_from_config(*args, tied=tied, qkv_bias=cfg.get("model_type") == "qwen2"), *args, tied=tied)


def _shape_from_gguf(path: Path) -> MemoryShape:
    from gguf import GGUFReader

    r = GGUFReader(str(path))

    def field(name: str):
        f = r.fields.get(name)
        return f.contents() if f is not None else None

    arch = field("general.architecture")
    h, heads = field(f"{arch}.embedding_length"), field(f"{arch}.attention.head_count")
    kv = field(f"{arch}.attention.head_count_kv") or heads
    names = [t.name for t in r.tensors]
    layers = len({m.group(1) for n in names if (m := re.match(r"blk\.(\d+)\.", n))})
    vocab = field(f"{arch}.vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
    params = int(sum(int(t.n_elements) for t in r.tensors))
    return MemoryShape(params, int(vocab), int(h), layers, int(field(f"{arch}.feed_forward_length")), int(heads), int(kv), int(h) // int(heads), tied="output.weight" not in names)


# The reference setup's hub models, from their published config.json (used when the hub cannot be asked).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "Qwen/Qwen2.5-3B": dict(model_type="qwen2", vocab_size=151936, hidden_size=2048, num_hidden_layers=36, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "HuggingFaceTB/SmolLM2-135M": dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}
for _name in ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"):
    KNOWN_CONFIGS[_name] = KNOWN_CONFIGS[_name.removesuffix("-Instruct")]


def model_shape(path: str, flag: str = "--model.path") -> MemoryShape:
    """The shape of the model at ``path``: a folder's config.json, a .gguf file's metadata, a hub id's
    cached config.json, else ``KNOWN_CONFIGS``. Raises ConfigError naming ``flag`` when none is readable."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return _shape_from_gguf(p)
    if (p / "config.json").is_file():
        return shape_from_config(json.loads((p / "config.json").read_text()))
    if p.exists():
        raise ConfigError(f"{flag} {path}: no config.json to read the model's shape from")
    # lazy: `tldr-rlhf plan --help` parses PlanArgs without torch and transformers
    from .checkpoints import hub_config

    cfg = hub_config(path) or KNOWN_CONFIGS.get(path)
    if cfg is None:
        raise ConfigError(f"{flag} {path}: cannot read its config.json (not a local folder or .gguf, not cached, no network); give a local path")
    return shape_from_config(cfg)


# ----------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor on the target device."""

    master: int  # trained weights
    frozen: int  # reference policy, reward model
    compute: int  # activations, KV cache
    optimizer: int  # AdamW states per parameter (8 fp32, 2 with 8-bit)


def precision(device: Literal["cuda", "cpu"], dtype: str, optim_8bit: str = "auto") -> Precision:
    """The precision rules of ``modeling``: ``bfloat16`` (and ``auto`` on CUDA) keeps float32 master
    weights under bfloat16 autocast; the frozen reference and reward model hold float32 weights and run
    under the same autocast (``modeling.frozen_weights_dtype``: KL exactly 0 at the first update); on
    the CPU ``auto`` is float32. 8-bit AdamW: ``auto`` means on with CUDA (bitsandbytes)."""
    mixed = dtype == "bfloat16" or (dtype == "auto" and device == "cuda")
    eight = optim_8bit == "on" or (optim_8bit == "auto" and device == "cuda")
    return Precision(master=4, frozen=4, compute=2 if mixed else 4, optimizer=2 if eight else 8)


@dataclass
class StageEstimate:
    """Estimated peak bytes per device of one stage, by part."""

    stage: str
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0
    frozen: float = 0.0
    overhead: float = 0.0
    engine: float = 0.0  # --rollout-engine vllm: its weights, KV cache and (CUDA) margin (engine_memory.py)
    notes: list[str] = dataclasses.field(default_factory=list)

    PARTS = ("weights", "gradients", "optimizer", "activations", "kv_cache", "frozen", "overhead", "engine")

    @property
    def total(self) -> float:
        return sum(getattr(self, p) for p in self.PARTS)


OVERHEAD = {"cuda": 1.0 * GIB, "cpu": 0.6 * GIB}  # CUDA context + allocator slack; CPU: python, torch, transformers, tokenizer


def activation_bytes(shape: MemoryShape, tokens: int, bytes_per: int, *, checkpointing: bool = False) -> float:
    """Activations one micro-batch of ``tokens`` tokens keeps for its backward: per token and layer
    ``10 H + 4 I + 4 kv_dim`` elements; with activation checkpointing only each layer's input (H) is
    kept, plus one layer's activations while it is recomputed."""
    per_layer = 10 * shape.hidden + 4 * shape.intermediate + 4 * shape.kv_dim
    if checkpointing:
        return tokens * bytes_per * (shape.layers * shape.hidden + per_layer)
    return tokens * bytes_per * shape.layers * per_layer


def lora_params(shape: MemoryShape, r: int) -> int:
    """Adapter parameters of rank ``r`` on every linear layer of the decoder (q, k, v, o, gate, up, down)."""
    q = shape.heads * shape.head_dim
    dims = [(shape.hidden, q), (shape.hidden, shape.kv_dim), (shape.hidden, shape.kv_dim), (q, shape.hidden), (shape.hidden, shape.intermediate), (shape.hidden, shape.intermediate), (shape.intermediate, shape.hidden)]
    return shape.layers * r * sum(a + b for a, b in dims)


def layer_params(shape: MemoryShape) -> int:
    """Weights of one decoder block (biases left out)."""
    return (shape.params - shape.vocab * shape.hidden * (1 if shape.tied else 2) - shape.hidden) // shape.layers


def _trained(est: StageEstimate, shape: MemoryShape, prec: Precision, *, world: int, lora_r: int = 0, top_layers: int = 0, load_in_4bit: bool = False, shard: bool = False) -> None:
    """Add a trained model's weights, gradients and optimizer states (divided over ``world`` devices
    when ``shard``: FSDP, ``--run.fsdp``): every weight, the LoRA adapters, or the ``top_layers`` top
    blocks only. Sharded, a device also holds what FSDP gathers at a time: the root unit (embeddings
    and LM head, kept gathered from the forward to the backward) and one transformer block."""
    div = world if shard and world > 1 else 1
    if div > 1:
        gathered = shape.vocab * shape.hidden * (1 if shape.tied else 2) + layer_params(shape)
        est.weights += gathered * prec.master * (1 - 1 / div)
    if lora_r:
        trainable = lora_params(shape, lora_r)
    elif top_layers > 0:  # the embedding stays frozen even when N covers every block
        trainable = min(top_layers, shape.layers) * layer_params(shape) + shape.hidden
    else:
        trainable = shape.params
    base = 0.5 if load_in_4bit else prec.master  # QLoRA: NF4 base weights, half a byte each
    est.weights += (shape.params * (base if lora_r else prec.master) + (trainable * prec.master if lora_r else 0)) / div
    est.gradients += trainable * 4 / div
    est.optimizer += trainable * prec.optimizer / div


def pair_tokens(cfg, pairs: int, query: int, response: int) -> int:
    """Tokens in one forward of ``pairs`` preference pairs: the query once and both responses when the
    pair shares its prompt (``cfg.shared_prompt`` of the reward-model or DPO config), else two full rows.
    Packed micro-batches (``padding_free``) hold the same tokens without the padding: at the caps (the
    worst micro-batch, which the plan sizes for) the count is the same."""
    return pairs * query + 2 * pairs * response if cfg.shared_prompt else 2 * pairs * (query + response)


def estimate_stage(stage: str, cfg: Any, *, device: Literal["cuda", "cpu"] = "cuda", world: int = 1, shapes: dict[str, MemoryShape] | None = None, lengths: tuple[int, int] | None = None) -> StageEstimate:
    """Peak bytes per device of training stage ``stage`` (a ``train`` row of ``stages.STAGES``; its
    ``plan_kind`` says which parts it has) with config
    ``cfg`` on ``world`` devices of kind ``device``. ``shapes`` maps a model path to its shape (read with
    ``model_shape`` when missing). Sequence lengths are the caps (``max_query_length`` and the response
    cap: the worst micro-batch), or ``lengths`` = (longest query, longest response) when the data is
    known to be shorter."""
    shapes = shapes if shapes is not None else {}

    def shape_of(path: str, flag: str) -> MemoryShape:
        if path not in shapes:
            shapes[path] = model_shape(path, flag)
        return shapes[path]

    est = StageEstimate(stage, overhead=OVERHEAD[device])
    data = cfg.data
    query = lengths[0] if lengths else data.max_query_length

    def response_cap(cap: int) -> int:
        return min(cap, lengths[1]) if lengths else cap
    kind = COMMANDS[stage].plan_kind
    if kind in ("sequences", "pairs"):
        model = cfg.model
        shape = shape_of(model.path, "--model.path")
        prec = precision(device, model.dtype, cfg.optim.optim_8bit)
        top = cfg.train_layers if kind == "pairs" else 0  # the reward model's --train-layers; SFT trains every block
        ckpt = model.gradient_checkpointing
        _trained(est, shape, prec, world=world, lora_r=model.lora_r, top_layers=top, load_in_4bit=model.load_in_4bit, shard=cfg.run.fsdp)
        if kind == "sequences":
            response = response_cap(data.max_response_length)
            tokens = cfg.micro_batch_size * (query + response)
            est.activations = activation_bytes(shape, tokens, prec.compute, checkpointing=ckpt) + 2 * cfg.micro_batch_size * response * shape.vocab * 4
        else:
            response = response_cap(data.max_response_length)
            pairs = cfg.micro_batch_size
            tokens = pair_tokens(cfg, pairs, query, response)
            # frozen lower blocks keep no activations (nothing below them needs a gradient)
            trained = shape if not 0 < top < shape.layers else dataclasses.replace(shape, layers=top)
            est.activations = activation_bytes(trained, tokens, prec.compute, checkpointing=ckpt)
        return est
    policy_path = cfg.sft_path
    shape = shape_of(policy_path, "--sft-path")
    prec = precision(device, cfg.dtype, cfg.optim.optim_8bit)
    lora_r = cfg.lora_r
    ckpt = cfg.gradient_checkpointing
    _trained(est, shape, prec, world=world, lora_r=lora_r, load_in_4bit=cfg.load_in_4bit, shard=cfg.run.fsdp)
    if kind == "preference":
        response = response_cap(data.max_response_length)
        pairs = cfg.micro_batch_size
        tokens = pair_tokens(cfg, pairs, query, response)
        est.activations = activation_bytes(shape, tokens, prec.compute, checkpointing=ckpt)
        est.notes.append("reference log-probs are computed once with the starting policy and cached (no second model)")
        return est
    # RL stages: a frozen reference policy and reward model (none for a text reward: --reward rouge-l),
    # generation, and the trained policy
    # lazy: `tldr-rlhf plan --help` parses PlanArgs without torch and transformers
    from .reward.specs import parse_reward, rl_reward_spec

    spec, flag = rl_reward_spec(cfg)
    models = [t.text for t in parse_reward(spec, flag=flag) if t.kind == "model"]
    rm_shapes = [shape_of(m, flag) for m in models]
    rm = rm_shapes[0] if rm_shapes else None  # PPO's value model starts from the first one
    response = cfg.response_length  # sampled responses: up to the cap (a policy that rarely ends early fills it)
    est.frozen = (0 if lora_r else shape.params * prec.frozen) + sum(r.params for r in rm_shapes) * prec.frozen
    seq = query + response
    if kind == "actor-critic":
        value = rm or shape  # the value model: a copy of the reward model, else of the SFT backbone
        _trained(est, value, prec, world=world, lora_r=lora_r, shard=cfg.run.fsdp)  # its own adapters under LoRA
        rows = cfg.micro_batch_size
        est.activations = activation_bytes(shape, rows * seq, prec.compute, checkpointing=ckpt) + activation_bytes(value, rows * seq, prec.compute, checkpointing=ckpt)
        gen_rows = cfg.local_batch_size(world)
    else:
        rows, group = cfg.micro_batch_size, cfg.group_size  # online DPO: a pair per prompt
        # with the shared prompt a micro-batch holds whole groups (or part of one): each query runs once
        shared = cfg.shared_prompt and not ckpt and world == 1
        tokens = -(-rows // group) * query + rows * response if shared else rows * seq
        est.activations = activation_bytes(shape, tokens, prec.compute, checkpointing=ckpt)
        gen_rows = cfg.local_prompts(world) * group
    if cfg.rollout_engine == "vllm":  # vLLM samples every sequence of the rollout at once; the policy generates nothing
        est.engine, kv = stage_engine_bytes(cfg, shape.params, shape.layers, shape.kv_heads, shape.head_dim, sequences=gen_rows, tokens=seq, device=device)
        per = f" (one engine per process, whole weights, this process's share of the rollout)" if world > 1 else ""
        est.notes.append(f"engine: vLLM's weights and its KV cache of {gib(kv)} GiB for {gen_rows} sequences of {seq} tokens{per}")
    gen_rows = min(gen_rows, cfg.forward_batch_size or gen_rows)
    est.kv_cache = 0 if est.engine else 2 * shape.layers * shape.kv_dim * seq * gen_rows * prec.compute
    # the rollout's scoring passes (old-policy and reference log-probs) hold a forward batch's response
    # logits and their log-softmax in float32; they come before the update, so the larger of the two counts
    scoring = 2 * gen_rows * response * shape.vocab * 4
    if scoring > est.activations:
        est.activations = scoring
        est.notes.append("activations: the rollout's scoring pass (response logits), larger than the update's")
    return est


# ----------------------------------------------------------------------------------------------
# The cheapest change that fits


def suggestion(stage: str, cfg: Any, est: StageEstimate, *, budget: float, device: str, world: int, shapes: dict[str, MemoryShape]) -> str:
    """The cheapest change (in this order) that brings the stage under ``budget``: a smaller
    micro-batch, activation checkpointing, FSDP on several devices (``--run.fsdp``: the same numbers,
    more communication), 8-bit AdamW, LoRA r=16 (each on top of the ones before); "" when it fits, a
    sentence saying none is enough otherwise."""
    if est.total <= budget:
        return ""
    micro = cfg.micro_batch_size
    while micro > 1:
        micro //= 2
        trial = _with(cfg, micro_batch_size=micro)
        if estimate_stage(stage, trial, device=device, world=world, shapes=shapes).total <= budget:
            return f"--micro-batch-size {micro} (gradient accumulation keeps the global batch)"
    supervised = COMMANDS[stage].family == "supervised"  # their model settings are under --model.
    ckpt_flag = "--model.gradient-checkpointing" if supervised else "--gradient-checkpointing"
    for micro in sorted({cfg.micro_batch_size, 1}, reverse=True):  # activation checkpointing: ~30% slower steps
        trial = _checkpointing(_with(cfg, micro_batch_size=micro))
        if estimate_stage(stage, trial, device=device, world=world, shapes=shapes).total <= budget:
            return (f"--micro-batch-size {micro} " if micro != cfg.micro_batch_size else "") + f"{ckpt_flag} (activation checkpointing)"
    one = _checkpointing(_with(cfg, micro_batch_size=1))
    fsdp = ""
    if world > 1 and not cfg.run.fsdp:
        one = dataclasses.replace(one, run=dataclasses.replace(one.run, fsdp=True))
        fsdp = " --run.fsdp"
        if estimate_stage(stage, one, device=device, world=world, shapes=shapes).total <= budget:
            return f"--micro-batch-size 1 {ckpt_flag} --run.fsdp (FSDP: weights, gradients and AdamW states sharded over {world} devices)"
    optim = dataclasses.replace(cfg.optim, optim_8bit="on")
    if estimate_stage(stage, dataclasses.replace(one, optim=optim), device=device, world=world, shapes=shapes).total <= budget:
        return f"--micro-batch-size 1 {ckpt_flag}{fsdp} --optim.optim-8bit on (bitsandbytes 8-bit AdamW, CUDA)"
    lora = _lora(one, 16)
    lora_flag = "--model.lora-r 16" if supervised else "--lora-r 16"
    if lora is not None and estimate_stage(stage, lora, device=device, world=world, shapes=shapes).total <= budget:
        return f"--micro-batch-size 1 {ckpt_flag} {lora_flag} (LoRA)"
    return "does not fit even with micro-batch 1, activation checkpointing, 8-bit AdamW and LoRA: a smaller model or a larger device"


def _with(cfg: Any, **changes) -> Any:
    fields = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if k in fields})


def _checkpointing(cfg: Any) -> Any:
    fields = {f.name for f in dataclasses.fields(cfg)}
    if "model" in fields and "gradient_checkpointing" in {f.name for f in dataclasses.fields(cfg.model)}:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=True))
    return _with(cfg, gradient_checkpointing=True)


def _lora(cfg: Any, r: int) -> Any | None:
    fields = {f.name for f in dataclasses.fields(cfg)}
    if "model" in fields and "lora_r" in {f.name for f in dataclasses.fields(cfg.model)}:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora_r=r))
    if "lora_r" in fields:
        return dataclasses.replace(cfg, lora_r=r)
    return None


def gib(x: float) -> str:
    return f"{x / GIB:.1f}"


# ----------------------------------------------------------------------------------------------
# The pre-flight check at the start of every training stage


def preflight(stage: str, cfg: Any) -> StageEstimate | None:
    """At the start of a training stage, before any model loads, on CUDA: log the estimate for this
    stage on this device and raise ConfigError when it cannot fit (estimate above the device's memory)
    unless ``--run.no-memory-check``. Nothing on the CPU (``tldr-rlhf plan --device cpu`` estimates
    it). A model whose shape cannot be read (no config reachable) skips the check with one log line.
    Returns the estimate (None when skipped)."""
    import logging
    import os

    import torch

    log = logging.getLogger(__name__)
    if stage not in TRAIN_STAGES or not torch.cuda.is_available():
        return None
    device = "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        est = estimate_stage(stage, cfg, device=device, world=world)
    except Exception as e:  # noqa: BLE001 - an unreadable shape never stops a run
        log.info("memory plan skipped (%s: %s)", type(e).__name__, e)
        return None
    budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if est.engine and cfg.vllm_gpu_memory_utilization:  # a share the user set: vLLM takes it whatever it needs
        est.engine = cfg.vllm_gpu_memory_utilization * budget
    parts = ", ".join(f"{p} {gib(getattr(est, p))}" for p in StageEstimate.PARTS if getattr(est, p) >= 0.05 * GIB)
    log.info("memory plan: %s needs about %s GiB per GPU of %s GiB (%s)", stage, gib(est.total), gib(budget), parts)
    if est.total > budget and cfg.run.memory_check:
        change = suggestion(stage, cfg, est, budget=budget, device=device, world=world, shapes={})
        raise ConfigError(
            f"memory plan: {stage} needs about {gib(est.total)} GiB per GPU ({parts}) but the GPU has {gib(budget)} GiB; "
            f"try {change}; --run.no-memory-check runs it anyway"
        )
    return est
