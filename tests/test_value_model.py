"""Value model and reward scoring on tiny models: values at the positions that predict response
tokens, scores at the last real token, the value model a trainable copy of the reward model."""

import pytest
import torch
from transformers import Qwen2ForSequenceClassification

from tldr_rlhf.data.batching import collate_query_response
from tldr_rlhf.reward.reward_model import RewardModelConfig, ScalarRewardModel
from tldr_rlhf.value_model import PolicyAndValue, ValueModel, backbone_and_head, score_at_last_token

from rl_fixtures import make_tiny_qwen2, tiny_config


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok(qwen_tokenizer):
    return qwen_tokenizer


@pytest.fixture(scope="module")
def rm(tok):
    torch.manual_seed(0)
    return ScalarRewardModel(RewardModelConfig(text_config=tiny_config())).eval()


def test_nplus_18_value_model_starts_as_the_reward_model(tok, rm):
    # [left-padded query | right-padded response]; pad == EOS, so the mask, not the ids, marks the end
    batch = collate_query_response([[11, 12, 13], [14]], [[21, 22, tok.eos_token_id], [23, tok.eos_token_id]], tok.pad_token_id)
    vm = ValueModel.from_scalar_model(rm)
    with torch.no_grad():
        values = vm(batch.input_ids, batch.attention_mask, batch.query_width)
        full = rm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, return_values=True).values
        scores = score_at_last_token(rm, batch.input_ids, batch.attention_mask)
    # values[:, t] is the head at column P - 1 + t (the state in which response token t is chosen)
    assert values.shape == (2, 3)
    torch.testing.assert_close(values, full[:, 2:5])
    # the score is the head at the last real token: column 5 for row 0 (EOS), column 4 for row 1
    torch.testing.assert_close(scores, torch.stack([full[0, 5], full[1, 4]]))
    # its own copy: training it does not touch the frozen reward model
    assert all(p.requires_grad for p in vm.parameters())
    with torch.no_grad():
        vm.head.weight.add_(1.0)
    assert not torch.equal(vm.head.weight, rm.score.weight)


def test_generic_sequence_classifier_scores_at_last_real_token(tok):
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.num_labels = 1
    clf = Qwen2ForSequenceClassification(cfg).eval()
    backbone, head = backbone_and_head(clf)
    assert head is clf.score and backbone is clf.model
    ids = torch.tensor([[tok.pad_token_id, 5, 6, tok.eos_token_id, tok.pad_token_id]])
    mask = torch.tensor([[False, True, True, True, False]])
    with torch.no_grad():
        hidden = clf.model(input_ids=ids, attention_mask=mask.long(), position_ids=torch.tensor([[0, 0, 1, 2, 2]])).last_hidden_state
        assert score_at_last_token(clf, ids, mask).item() == pytest.approx(clf.score(hidden[0, 3]).item(), abs=1e-5)
    with pytest.raises(TypeError, match="scalar-head"):
        backbone_and_head(make_tiny_qwen2())


def test_policy_and_value_forward_shapes(tok, rm):
    torch.manual_seed(0)
    pv = PolicyAndValue(make_tiny_qwen2(), ValueModel.from_scalar_model(rm))
    batch = collate_query_response([[11, 12, 13], [14]], [[21, 22, 2], [23]], tok.pad_token_id)
    logits, values = pv(batch.input_ids, batch.attention_mask, batch.query_width)
    assert logits.shape == (2, 3, len(tok)) and values.shape == (2, 3)


def test_value_model_without_a_reward_model_starts_near_zero(tok):
    # a text reward has no reward model to start the value model from: the SFT backbone with a fresh
    # head N(0, 1/(H + 1)), bias 0 (OpenRLHF's critic scale). The reward head's 1/sqrt(H + 1) would give
    # values of the size of the rewards themselves; with H = 64 it is 8.06x larger than this scale.
    lm = make_tiny_qwen2(seed=0, hidden=64)
    torch.manual_seed(3)
    vm = ValueModel.from_causal_lm(lm)
    w = vm.head.weight.detach()
    assert w.shape == (1, 64)
    assert 0.7 / 65 < w.std().item() < 1.3 / 65
    assert torch.count_nonzero(vm.head.bias) == 0
    # its own trainable copy of the backbone: the policy's weights are not shared
    name, p = next(iter(vm.backbone.named_parameters()))
    assert p.requires_grad and p.data_ptr() != dict(lm.base_model.named_parameters())[name].data_ptr()
    batch = collate_query_response([[11, 12, 13]], [[21, 22, tok.eos_token_id]], tok.pad_token_id)
    with torch.no_grad():
        values = vm(batch.input_ids, batch.attention_mask, batch.query_width)
        hidden = lm.base_model(input_ids=batch.input_ids).last_hidden_state[0, 2:5]
    # values[:, t] = w . h(P - 1 + t), the head applied to the backbone's hidden state
    torch.testing.assert_close(values[0], hidden @ w[0])
