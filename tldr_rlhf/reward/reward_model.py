"""Scalar reward model: a causal-LM backbone plus a linear head, one score per sequence (N+ details 10-15).

The score is the head applied to the final hidden state of the response's EOS token, the last real
token of the row (N+ detail 11). That position is found from the attention mask, never from
``input_ids != pad`` (with Qwen, pad = EOS = ``<|endoftext|>``, N+ detail 3), so left-padded,
right-padded and ``[left-padded query | right-padded response]`` rows all read the response's own
EOS. The head is ``Linear(d_model, 1)`` with weights N(0, 1/sqrt(d_model + 1)) and bias 0 (N+
detail 10); after training its bias is shifted so that the mean reward of (query, reference) pairs is
0, and the shift is stored in the config as ``reward_offset`` (N+ detail 14). Dropout is off.

The checkpoint is an ordinary Hugging Face folder with its own ``model_type`` (``tldr_rlhf_reward``),
a config that nests the backbone's config as ``text_config``, and a copy of this file with an
``auto_map``, so it loads back through the Auto classes:

* with this package imported: ``AutoModelForSequenceClassification.from_pretrained(path)``;
* anywhere else: ``AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)``.

A library class (``Qwen2ForSequenceClassification``) is deliberately not used: it reads the score at
the last token that is not the pad id, which with pad = EOS is the token before the EOS, and its head
has no bias to carry the normalization.

The same network gives per-token values (``forward(..., return_values=True)`` -> (B, L)); PPO's value
model is initialized from the reward model (N+ detail 18) by loading this checkpoint.

This file imports only torch and transformers, so that it runs as remote code from a checkpoint.
Shapes: B batch, L sequence length, P query width, T response width, K scores per row, d d_model.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

MODEL_TYPE = "tldr_rlhf_reward"

try:  # transformers >= 5: composite configs declare their sub-configs with a spec
    from transformers.configuration_utils import SubConfigSpec

    _SUB_CONFIGS: dict[str, Any] = {"sub_configs_defaults": {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}}
except ImportError:  # transformers 4.x
    _SUB_CONFIGS = {"sub_configs": {"text_config": AutoConfig}}


def _as_config(value: Any) -> PretrainedConfig | None:
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", None)
        if model_type is None:
            raise ValueError("text_config needs a 'model_type'")
        return AutoConfig.for_model(model_type, **value)
    raise TypeError(f"text_config must be a config or a dict, got {type(value).__name__}")


class RewardModelConfig(PretrainedConfig):
    """Config of a ScalarRewardModel: the backbone's config (``text_config``) plus the head's facts.

    ``reward_offset``: the mean raw reward that normalization subtracted (already folded into the
    head bias; kept for the record). ``normalization``: what it was computed on (source, count, mean
    and std before). ``head_init_std``: the std the head was initialized with.
    """

    model_type = MODEL_TYPE

    def __init__(self, text_config=None, reward_offset: float = 0.0, normalization: dict | None = None, head_init_std: float | None = None, **kwargs):
        self.text_config = _as_config(text_config)
        self.reward_offset = float(reward_offset)
        self.normalization = normalization
        self.head_init_std = head_init_std
        kwargs.setdefault("num_labels", 1)
        kwargs.setdefault("problem_type", "regression")
        # The base __init__ propagates its (unset) attention implementation to sub-configs; a
        # backbone config passed in keeps the implementation its model was loaded with.
        impl = getattr(self.text_config, "_attn_implementation", None) if self.text_config is not None else None
        super().__init__(**kwargs)
        if impl is not None and getattr(self.text_config, "_attn_implementation", None) is None:
            self.text_config._attn_implementation = impl
        if self.text_config is not None:
            for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
                if getattr(self, key, None) is None and getattr(self.text_config, key, None) is not None:
                    setattr(self, key, getattr(self.text_config, key))

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size


for _key, _value in _SUB_CONFIGS.items():  # dtype / attention implementation reach the backbone's config
    setattr(RewardModelConfig, _key, _value)


@dataclass
class RewardModelOutput(ModelOutput):
    """``logits``: (B, 1) scores (the Hugging Face sequence-classification shape); ``rewards``: (B,);
    ``values``: (B, L) head output at every position when asked; ``hidden_states``: backbone's when asked."""

    logits: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    values: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True of each row of a (B, L) mask -> (B,) int64 (0 for an all-False row).

    For ``[left-padded query | right-padded response]`` rows that is the response's EOS, whatever the
    token ids of the padding are."""
    mask = attention_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.zeros_like(positions)).max(-1).values


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ScalarRewardModel(PreTrainedModel):
    """Backbone (any ``AutoModel`` decoder) + ``score = Linear(d_model, 1)``.

    ``forward(input_ids, attention_mask)`` scores each row at its last real token (from the mask);
    with ``num_queries`` / ``query_width`` it runs each shared query once (chosen and rejected of a
    comparison in one pass).
    """

    config_class = RewardModelConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: RewardModelConfig, backbone: nn.Module | None = None):
        # PreTrainedModel.__init__ resets the attention implementation of the sub-config, which a
        # backbone passed in shares; keep the one it was loaded with (else masks are not built).
        impl = getattr(backbone.config, "_attn_implementation", None) if backbone is not None else None
        super().__init__(config)
        if config.text_config._attn_implementation is None:
            config.text_config._attn_implementation = impl or config._attn_implementation
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.text_config)
        d = config.text_config.hidden_size
        self.score = nn.Linear(d, 1, bias=True)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` (the Auto classes call it too), then every CPU weight
        not at the allocator's alignment is copied into memory of its own: see ``_own_misaligned``."""
        loaded = super().from_pretrained(*args, **kwargs)
        _own_misaligned(loaded[0] if isinstance(loaded, tuple) else loaded)  # output_loading_info=True
        return loaded

    # -- initialization -------------------------------------------------------------------------

    def head_std(self) -> float:
        """N(0, 1/sqrt(d_model + 1)) (N+ detail 10)."""
        return 1.0 / math.sqrt(self.config.text_config.hidden_size + 1)

    @torch.no_grad()
    def reset_head(self) -> None:
        """Re-draw the head: weight N(0, 1/sqrt(d_model + 1)), bias 0, offset 0."""
        nn.init.normal_(self.score.weight, mean=0.0, std=self.head_std())
        nn.init.zeros_(self.score.bias)
        self.config.head_init_std = self.head_std()
        self.config.reward_offset = 0.0
        self.config.normalization = None

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only our own module; the backbone (a PreTrainedModel) is initialized by its own class.
        if module is getattr(self, "score", None):
            nn.init.normal_(module.weight, mean=0.0, std=self.head_std())
            nn.init.zeros_(module.bias)
            self.config.head_init_std = self.head_std()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    # -- forward --------------------------------------------------------------------------------

    def apply_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the scalar head in float32 (outside autocast): (..., d) -> (...)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return F.linear(hidden.float(), self.score.weight.float(), self.score.bias.float()).squeeze(-1)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_values: bool = False,
        num_queries: int | None = None,
        query_width: int | None = None,
        score_at: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> RewardModelOutput:
        """Score each row at its last real token.

        ``attention_mask`` (B, L), True/1 on real tokens (None: every token is real). Position ids
        default to ``cumsum(mask) - 1`` (N+ detail 9).
        ``return_values``: also the head at every position, ``values`` (B, L) float32.
        ``num_queries`` = Q with ``query_width`` = P: shared prompt. Rows are
        ``[left-padded query | right-padded response]`` with row r holding the query of row r % Q
        (``collate_pairs``: Q = B pairs, 2B rows). The Q queries run once and every response
        continues from their key/value cache: the same scores as full rows up to float rounding,
        with the query (the long part) computed once per pair instead of twice. Not in a training
        forward under activation checkpointing, whose blocks ignore caches, nor for an FSDP-sharded
        model (``--run.fsdp``): full rows there.
        ``score_at`` (R,): a packed batch (the package's ``data/packing.py``), input_ids and
        position_ids (1, S) one row of every sequence's real tokens; the R rewards are read at
        these positions (each response's EOS) and no mask is built (the caller sets the attention).
        """
        if getattr(self.backbone.config, "_attn_implementation", "") is None:
            raise RuntimeError("the backbone's attention implementation is unset: it would build no attention mask")
        if score_at is not None:
            if position_ids is None:
                raise ValueError("score_at (a packed batch) needs its position_ids")
            hidden = self.backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False, return_dict=True).last_hidden_state
            rewards = self.apply_head(hidden[0, score_at])
            return RewardModelOutput(logits=rewards[:, None], rewards=rewards)
        ref = input_ids if input_ids is not None else inputs_embeds
        b, length = ref.shape[0], ref.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones((b, length), dtype=torch.long, device=ref.device)
        if position_ids is None:
            position_ids = _positions(attention_mask)
        # under activation checkpointing transformers drops key/value caches in training forwards with
        # gradients: the shared prompt then runs full rows (same scores)
        checkpointing = self.training and torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) is True for m in self.backbone.modules())
        # an FSDP-sharded backbone runs once per forward: its units free their gathered weights after a
        # call, which autograd of an earlier call in the same forward still needs (full rows, same scores)
        shared = num_queries is not None and input_ids is not None and not return_values and not output_hidden_states and not checkpointing and not _sharded(self)
        if shared:
            hidden, index = self._shared_prompt_hidden(input_ids, attention_mask, position_ids, num_queries, query_width)
        else:
            out = self.backbone(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask.long(),
                position_ids=position_ids,
                use_cache=False,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
            hidden, index = out.last_hidden_state, last_real_index(attention_mask)
        rows = torch.arange(b, device=hidden.device)
        rewards = self.apply_head(hidden[rows, index])  # (B,)
        values = self.apply_head(hidden) if return_values else None
        hidden_states = out.hidden_states if output_hidden_states and not shared else None
        return RewardModelOutput(logits=rewards[:, None], rewards=rewards, values=values, hidden_states=hidden_states)

    def _shared_prompt_hidden(self, input_ids, attention_mask, position_ids, q: int, p: int | None):
        """(final hidden states of the response part (R, T, d), column of each row's last real token)."""
        from transformers import DynamicCache

        rows = input_ids.shape[0]
        if p is None or not 0 < p < input_ids.shape[1]:
            raise ValueError(f"shared prompt needs 0 < query_width < {input_ids.shape[1]}, got {p}")
        if rows % q:
            raise ValueError(f"{rows} rows do not split into groups of {q} queries")
        mask = attention_mask.long()
        t = input_ids.shape[1] - p
        # One embedding lookup for the queries and the responses: one (V, d) embedding gradient in
        # backward instead of one per backbone call (a dense V x d fill and add each).
        embeds = self.backbone.get_input_embeddings()(torch.cat([input_ids[:q, :p].reshape(-1), input_ids[:, p:].reshape(-1)]))
        query_embeds, response_embeds = embeds[: q * p].view(q, p, -1), embeds[q * p :].view(rows, t, -1)
        cache = DynamicCache()
        self.backbone(inputs_embeds=query_embeds, attention_mask=mask[:q, :p], position_ids=position_ids[:q, :p], use_cache=True, **_kv_cache_kwargs(self.backbone, cache))
        cache.batch_select_indices(torch.arange(q, device=input_ids.device).repeat(rows // q))
        h = self.backbone(inputs_embeds=response_embeds, attention_mask=mask, position_ids=position_ids[:, p:], use_cache=True, **_kv_cache_kwargs(self.backbone, cache)).last_hidden_state
        response_mask = attention_mask[:, p:].bool()
        if not response_mask.any(-1).all():
            raise ValueError("shared prompt: every row needs at least one response token (its EOS)")
        return h, last_real_index(response_mask)


_CPU_ALIGNMENT = 64  # bytes: where PyTorch's CPU allocator places every tensor it allocates


@torch.no_grad()
def _sharded(model: nn.Module) -> bool:
    """Whether FSDP2 sharded ``model`` or a submodule (``train.fsdp.is_sharded``; this file is saved
    beside checkpoints as their remote code, so it imports nothing from the package)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _own_misaligned(model: nn.Module) -> None:
    """Copy each CPU parameter and buffer that is not 64-byte aligned into freshly allocated memory
    (in place: ties and optimizer references stay valid).

    transformers >= 5 leaves safetensors weights where they lie in the memory-mapped checkpoint, at
    the file's byte offsets. In a reward-model file the 1-element ``score.bias`` comes just before
    ``score.weight``, which therefore starts on a 4-byte boundary, and the CPU matrix-vector kernel
    behind the head sums a vector that is not 16-byte aligned in another order (scores 1 ulp apart).
    Aligned like the saved model's, the reloaded weights go through the same kernel path and give
    the same scores bit for bit."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and t.numel() and t.data_ptr() % _CPU_ALIGNMENT:
            t.data = t.data.clone()


def _kv_cache_kwargs(model: nn.Module, cache) -> dict[str, Any]:
    # modeling.kv_cache_kwargs, repeated because this file imports only torch and transformers: the
    # forward takes the cache as ``cache`` from transformers 5.24 on, as ``past_key_values`` before.
    return {"cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values": cache}


def score(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward of each row, read at its last real token. Shapes: (B, L), (B, L) -> (B,) float32.

    Works for any padding (left, right, or ``[left-padded query | right-padded response]``): the
    position comes from the mask. Gradients flow when enabled; wrap in ``torch.no_grad()`` to score.
    """
    return model(input_ids=input_ids, attention_mask=attention_mask).rewards


def response_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_width: int) -> torch.Tensor:
    """Per-token values of the response of ``[left-padded query | right-padded response]`` rows.

    Returns (B, T) with ``out[:, t]`` = the head at position ``P - 1 + t``: the value of the state in
    which response token t is chosen (the convention of the N+ code, ``values[:, P - 1 : -1]``).
    """
    values = model(input_ids=input_ids, attention_mask=attention_mask, return_values=True).values
    return values[:, query_width - 1 : -1]


def transformer_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's list of transformer blocks (the ModuleList with num_hidden_layers entries)."""
    n = getattr(backbone.config, "num_hidden_layers", None)
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(backbone).__name__}")


def train_top_layers(model: ScalarRewardModel, n: int) -> None:
    """Train only the top ``n`` transformer blocks, the final norm and the head (``n`` <= 0: all).

    Embeddings and the lower blocks are frozen, so backpropagation stops at block L - n. A speed
    option for small machines; the papers train every weight."""
    if n <= 0:
        return
    blocks = transformer_blocks(model.backbone)
    frozen = set()
    for block in list(blocks)[: max(0, len(blocks) - n)]:
        frozen.update(id(p) for p in block.parameters())
    for module in model.backbone.modules():
        if isinstance(module, nn.Embedding):
            frozen.update(id(p) for p in module.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)


if __name__.startswith("tldr_rlhf"):
    # In-process registration (no trust_remote_code needed while this package is imported) and the
    # auto_map written into saved checkpoints (trust_remote_code=True elsewhere).
    AutoConfig.register(MODEL_TYPE, RewardModelConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(RewardModelConfig, ScalarRewardModel, exist_ok=True)
    RewardModelConfig.register_for_auto_class()
    ScalarRewardModel.register_for_auto_class("AutoModelForSequenceClassification")
