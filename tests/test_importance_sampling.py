"""Truncated importance sampling (Yao et al. 2025) and the sampler / trainer mismatch stats, against
values worked out by hand; and the RL losses with the weights: all-ones weights change nothing."""

import math

import pytest
import torch

from tldr_rlhf.importance_sampling import mismatch_stats, padded_logprobs, sequence_is_weights, truncated_is_weights
from tldr_rlhf.advantages import broadcast_over_response
from tldr_rlhf.losses import grpo_loss, ppo_policy_loss, rloo_loss

# two responses of 3 and 2 tokens (the last position of row 1 is padding)
TRAIN = torch.tensor([[-1.2, -0.5, -2.0], [-0.3, -1.0, 0.0]])
SAMPLE = torch.tensor([[-1.5, -0.2, -0.4], [-0.3, -1.7, -9.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])
# d = train - sample: row 0: 0.3, -0.3, -1.6; row 1: 0.0, 0.7 (padding ignored)


def test_token_weights_by_hand():
    w = truncated_is_weights(TRAIN, SAMPLE, MASK, cap=2.0, level="token")
    # exp(0.3) = 1.3498588, exp(-0.3) = 0.7408182, exp(-1.6) = 0.2018965; exp(0) = 1; exp(0.7) = 2.0137527 -> cap 2.0; padding 1
    want = torch.tensor([[1.3498588, 0.7408182, 0.2018965], [1.0, 2.0, 1.0]])
    torch.testing.assert_close(w, want, atol=1e-6, rtol=0)


def test_sequence_weights_by_hand():
    w = truncated_is_weights(TRAIN, SAMPLE, MASK, cap=2.0, level="sequence")
    # row 0: sum d = 0.3 - 0.3 - 1.6 = -1.6 -> exp = 0.2018965 on its 3 tokens; row 1: 0.0 + 0.7 -> 2.0137527 -> cap 2.0; padding 1
    want = torch.tensor([[0.2018965, 0.2018965, 0.2018965], [2.0, 2.0, 1.0]])
    torch.testing.assert_close(w, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(sequence_is_weights(TRAIN, SAMPLE, MASK, cap=2.0), torch.tensor([0.2018965, 2.0]), atol=1e-6, rtol=0)
    # a higher cap lets row 1's weight through
    assert sequence_is_weights(TRAIN, SAMPLE, MASK, cap=5.0)[1].item() == pytest.approx(math.exp(0.7), abs=1e-5)


def test_same_logprobs_give_weight_exactly_one():
    # the hf engine: the sampler is the policy, logp_sample is logp_train -> every weight 1.0 exactly
    lp = torch.tensor([[-1.7, -0.123456789, -3.3], [-0.7, -2.9, -0.01]])
    for level in ("token", "sequence"):
        assert torch.equal(truncated_is_weights(lp, lp, MASK, cap=2.0, level=level), torch.ones(2, 3))


def test_bad_arguments_refused():
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(TRAIN, SAMPLE, MASK, cap=0.0)
    with pytest.raises(ValueError, match="level"):
        truncated_is_weights(TRAIN, SAMPLE, MASK, level="batch")
    with pytest.raises(ValueError, match="shapes"):
        truncated_is_weights(TRAIN, SAMPLE[:, :2], MASK)


def test_mismatch_stats_by_hand():
    s = mismatch_stats(TRAIN, SAMPLE, MASK, cap=2.0, threshold=0.1)
    # |d| = 0.3, 0.3, 1.6, 0.0, 0.7: mean 2.9 / 5 = 0.58, max 1.6, 4 of 5 above 0.1
    assert s["mismatch/logprob_abs_diff_mean"] == pytest.approx(0.58, abs=1e-6)
    assert s["mismatch/logprob_abs_diff_max"] == pytest.approx(1.6, abs=1e-6)
    assert s["mismatch/frac_above_threshold"] == pytest.approx(0.8)
    # k3 = expm1(d) - d: 0.0498588 + 0.0408182 + 0.8018965 + 0 + 0.3137527 = 1.2063262, / 5
    assert s["mismatch/k3_kl"] == pytest.approx(0.24126524, abs=1e-6)
    # exp(d) > 2 only for d = 0.7
    assert s["mismatch/frac_truncated"] == pytest.approx(0.2)
    zero = mismatch_stats(TRAIN, TRAIN, MASK)
    assert all(v == 0.0 for v in zero.values())


def test_padded_logprobs():
    t = padded_logprobs([[-0.5, -1.25], [-2.0]], 3)
    assert torch.equal(t, torch.tensor([[-0.5, -1.25, 0.0], [-2.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="row 0"):
        padded_logprobs([[-0.5, -1.25]], 1)


def _losses(is_weights, seq_weights):
    g = torch.Generator().manual_seed(0)
    new = (TRAIN + 0.05 * torch.randn(2, 3, generator=g)).requires_grad_()
    adv = torch.tensor([1.7, -0.9])
    grpo, _ = grpo_loss(new, TRAIN, TRAIN - 0.2, broadcast_over_response(adv, MASK), MASK, is_weights=is_weights)
    ppo, _ = ppo_policy_loss(new, TRAIN, adv[:, None].expand(2, 3), MASK, is_weights=is_weights)
    rloo, _ = rloo_loss(new, TRAIN, adv, MASK, is_weights=seq_weights)
    return grpo, ppo, rloo


def test_losses_with_unit_weights_are_unchanged_and_weights_scale_the_policy_gradient():
    base = _losses(None, None)
    ones = _losses(torch.ones(2, 3), torch.ones(2))
    for a, b in zip(base, ones):
        assert torch.equal(a, b)
    w = truncated_is_weights(TRAIN, SAMPLE, MASK)
    sw = sequence_is_weights(TRAIN, SAMPLE, MASK)
    weighted = _losses(w, sw)
    for a, b in zip(base, weighted):
        assert not torch.allclose(a, b)
    # rloo at ratio 1 (new == old): loss = -mean_b(w_b A_b) = -(0.2018965 * 1.7 + 2.0 * -0.9) / 2 = 0.72839
    loss, _ = rloo_loss(TRAIN.clone(), TRAIN, torch.tensor([1.7, -0.9]), MASK, is_weights=sw)
    assert loss.item() == pytest.approx(0.7283880, abs=1e-6)
