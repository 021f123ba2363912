"""Value model for PPO and the policy+value pair that one optimizer trains.

The value model is a transformer backbone with a scalar head, evaluated at every response
position: ``V(s_t)`` is read at the position that predicts response token t (the same alignment as
``modeling.response_logits``), so ``values[:, t]`` is the value of the state before token t is
sampled. PPO initializes it from the reward model, head included (N+ detail 18); it then trains
its own copy (the reward model stays frozen).

Scalar-head models are recognized by their parts: this project's ``reward.reward_model.ScalarRewardModel``
(``backbone`` + ``score``), a Hugging Face ``*ForSequenceClassification`` model with one label
(``base_model`` + ``score`` / ``classifier``), or any module with ``backbone`` and ``head``
attributes. Scores are read at the last real token of each row, found from the attention mask
(N+ detail 11), never from ``ids != pad``. Heads run in float32 outside autocast, as the reward
model's own ``apply_head`` does.

Shapes: B batch, L = P + T tokens, P query width, T response width, H hidden size, V vocabulary.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .modeling import response_logits
from .ops import position_ids_from_mask
from .reward.reward_model import ScalarRewardModel, last_real_index, score


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The (backbone, scalar head) of a scalar-head model. Raises TypeError when ``model`` has no
    recognizable single-output head."""
    if hasattr(model, "backbone") and hasattr(model, "head"):
        backbone, head = model.backbone, model.head
    else:
        head = getattr(model, "score", None) or getattr(model, "classifier", None)
        backbone = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or head.out_features != 1 or backbone is None or backbone is model:
        raise TypeError(f"{type(model).__name__} is not a scalar-head model (need a backbone and a Linear(H, 1) head)")
    return backbone, head


def _hidden(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = backbone(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _apply_head(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The scalar head in float32 outside autocast (as ``reward.reward_model.ScalarRewardModel.apply_head``):
    (..., H) -> (...)."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        bias = head.bias.float() if head.bias is not None else None
        return F.linear(hidden.float(), head.weight.float(), bias).squeeze(-1)


def score_at_last_token(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, num_queries: int | None = None, query_width: int | None = None) -> torch.Tensor:
    """Scalar score of each row read at its last real token (the response's EOS; N+ detail 11),
    found from the mask. A ``reward.reward_model.ScalarRewardModel`` scores itself (``reward.reward_model.score``);
    any other scalar-head model goes through its backbone and head here. Shapes: input_ids,
    attention_mask (B, L) -> (B,) float32. Raises ValueError for a row with no real token.
    ``num_queries`` = Q with ``query_width`` = P: a ScalarRewardModel runs each of the Q queries
    once (row r holds the query of row r % Q; see ``ScalarRewardModel.forward``); other models
    ignore them (full rows, the same scores)."""
    if not attention_mask.bool().any(-1).all():
        raise ValueError("a row of the attention mask has no real token")
    if isinstance(model, ScalarRewardModel):
        if num_queries is not None:
            return model(input_ids=input_ids, attention_mask=attention_mask, num_queries=num_queries, query_width=query_width).rewards.float()
        return score(model, input_ids, attention_mask).float()
    backbone, head = backbone_and_head(model)
    hidden = _hidden(backbone, input_ids, attention_mask)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return _apply_head(head, hidden[rows, last_real_index(attention_mask)])


class ValueModel(nn.Module):
    """Backbone + Linear(H, 1) giving per-token values of response positions."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @classmethod
    def from_scalar_model(cls, model: nn.Module) -> "ValueModel":
        """A trainable deep copy of a scalar-head model's backbone and head (N+ detail 18: the value
        model starts as the reward model, with its own copy of the head)."""
        backbone, head = backbone_and_head(model)
        vm = cls(copy.deepcopy(backbone), copy.deepcopy(head))
        for p in vm.parameters():
            p.requires_grad_(True)
        return vm

    @classmethod
    def from_causal_lm(cls, lm: nn.Module) -> "ValueModel":
        """Backbone of a causal LM with a fresh head N(0, 1/(H + 1)), bias 0: the value model of a run
        without a reward model to start from (a text reward, ``reward/specs.py``).

        The scale is OpenRLHF's for a critic started from a non-reward model, not the reward head's
        1/sqrt(H + 1) (N+ detail 10, for a head that then trains on every comparison): on the final
        hidden states of an LM (rms about 1.8, norm about 44 on SmolLM2-135M) the reward head's scale
        predicts values of mean |V| 1.4-2.1, larger than the rewards they should predict, and PPO's
        first advantages are then mostly value error (docs/gold.md); with 1/(H + 1) mean |V| is about
        0.07, so the first advantages are those of the rewards themselves (GAE with V close to 0)."""
        backbone = copy.deepcopy(lm.base_model)
        h = lm.config.hidden_size
        head = nn.Linear(h, 1, bias=True)
        nn.init.normal_(head.weight, std=1.0 / (h + 1))
        nn.init.zeros_(head.bias)
        return cls(backbone, head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_width: int) -> torch.Tensor:
        """Values (B, T) of the response positions of ``[left-padded query | response]`` rows
        (input_ids, attention_mask (B, P + T)); ``out[:, t]`` is read at column P - 1 + t."""
        hidden = _hidden(self.backbone, input_ids, attention_mask)
        # a copy, not a view of the head output: FSDP2 hooks a unit's output for backward, and an
        # in-place op on a view would bypass that hook
        return _apply_head(self.head, hidden[:, query_width - 1 : -1]).clone()


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so one optimizer, one ``accelerator.prepare`` and one
    checkpoint cover both (as N+ and MOSS-RLHF do)."""

    def __init__(self, policy: nn.Module, value: ValueModel):
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, T, V) predicting the response tokens, values (B, T))."""
        logits = response_logits(self.policy, input_ids, attention_mask, query_width)
        return logits, self.value(input_ids, attention_mask, query_width)
