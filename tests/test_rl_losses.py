"""Hand-worked checks of the RL losses in tldr_rlhf.losses (PPO policy and value, GRPO, RLOO, KL
estimators, loss aggregation)."""

import math

import pytest
import torch

from tldr_rlhf.losses import aggregate_loss, clipped_surrogate, grpo_loss, kl_estimate, ppo_policy_loss, rloo_loss, value_loss
from tldr_rlhf.ops import lengths_to_mask

LN15, LN05 = math.log(1.5), math.log(0.5)


def _mask(lengths, t):
    return lengths_to_mask(torch.tensor(lengths), t)


def test_nplus_24_k3_estimator():
    # d = logp - ref. d = 0.5: k1 0.5, k2 0.125, k3 = exp(-0.5) + 0.5 - 1 = 0.106531
    # d = -0.5: k3 = exp(0.5) - 0.5 - 1 = 0.148721 (k3 >= 0 even where k1 < 0); d = 0: all 0
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.5, -3.0]])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([[0.5, -0.5, 0.0]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([[0.125, 0.125, 0.0]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([[0.106531, 0.148721, 0.0]]), atol=1e-6, rtol=0)
    # the form: exp(ref - logp) - (ref - logp) - 1
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.exp(ref - logp) - (ref - logp) - 1)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "k4")


def test_nplus_16_clipped_policy_loss_hand_worked():
    # Four real tokens, clip 0.2 (ratio, advantage -> max(-A r, -A clip(r))):
    #   r 1.5, A +1: max(-1.5, -1.2) = -1.2  clipped
    #   r 0.5, A +1: max(-0.5, -0.8) = -0.5
    #   r 0.5, A -1: max( 0.5,  0.8) =  0.8  clipped
    #   r 1.5, A -1: max( 1.5,  1.2) =  1.5
    # token mean (the 5th, padded token is ignored): (-1.2 - 0.5 + 0.8 + 1.5) / 4 = 0.15; clipfrac 2/4
    # approx_kl = 0.5 * mean(log r ^ 2) = 0.5 * (2 * 0.164402 + 2 * 0.480453) / 4 = 0.161214
    old = torch.zeros(1, 5)
    logp = torch.tensor([[LN15, LN05, LN05, LN15, 3.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 50.0]])
    loss, m = ppo_policy_loss(logp, old, adv, _mask([4], 5), clip_range=0.2)
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert m["clipfrac"].item() == pytest.approx(0.5)
    assert m["approx_kl"].item() == pytest.approx(0.5 * (LN15**2 + LN05**2) / 2, abs=1e-6)
    assert m["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)


def test_ppo_policy_loss_at_ratio_one_is_the_policy_gradient():
    # logp == old: ratio exactly 1, nothing clipped, loss = -mean(A) and d loss / d logp_t = -A_t / n
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0, 4.0]])
    loss, m = ppo_policy_loss(logp, logp.detach().clone(), adv, _mask([2], 3))
    loss.backward()
    assert loss.item() == pytest.approx(-0.5)  # -(2 - 1) / 2
    assert m["ratio_mean"].item() == 1.0 and m["clipfrac"].item() == 0.0 and m["approx_kl"].item() == 0.0
    assert logp.grad.tolist() == [[-1.0, 0.5, 0.0]]


def test_nplus_24_dual_clip_on_negative_advantage_with_large_ratio():
    # r = 5, A = -1: standard clip gives max(5, 1.2) = 5; dual clip c = 3 bounds it: min(5, 3) = 3.
    # r = 2, A = -1: max(2, 1.2) = 2 < 3 -> unchanged. r = 5, A = +1: max(-5, -1.2) = -1.2 (dual clip
    # only applies to negative advantages).
    logp = torch.log(torch.tensor([[5.0, 2.0, 5.0]]))
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    plain, _ = clipped_surrogate(logp, torch.zeros_like(logp), adv, clip_range=0.2)
    dual, m = clipped_surrogate(logp, torch.zeros_like(logp), adv, clip_range=0.2, dual_clip=3.0)
    torch.testing.assert_close(plain, torch.tensor([[5.0, 2.0, -1.2]]))
    torch.testing.assert_close(dual, torch.tensor([[3.0, 2.0, -1.2]]))
    assert m["dual_clipped"].tolist() == [[True, False, False]]
    # the dual-clipped token passes no gradient (its loss is the constant -c A)
    lp = logp.clone().requires_grad_(True)
    clipped_surrogate(lp, torch.zeros_like(lp), adv, clip_range=0.2, dual_clip=3.0)[0].sum().backward()
    assert lp.grad[0, 0].item() == 0.0
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(logp, logp, adv, dual_clip=1.0)


def test_nplus_16_clipped_value_loss_hand_worked():
    # clip 0.2. Token 0: V 1.5, V_old 1.0, R 2.0: clipped V 1.2; (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64
    #   -> 0.5 * 0.64 = 0.32 (clipped branch larger).
    # Token 1: V 1.5, V_old 1.0, R 0: (1.5)^2 = 2.25, (1.2)^2 = 1.44 -> 0.5 * 2.25 = 1.125.
    # mean over the two real tokens (pad ignored) = (0.32 + 1.125) / 2 = 0.7225; vf_clipfrac 1/2
    v = torch.tensor([[1.5, 1.5, 9.0]])
    old = torch.tensor([[1.0, 1.0, 0.0]])
    ret = torch.tensor([[2.0, 0.0, -9.0]])
    loss, m = value_loss(v, old, ret, _mask([2], 3), clip_range=0.2)
    assert loss.item() == pytest.approx(0.7225, abs=1e-6)
    assert m["vf_clipfrac"].item() == pytest.approx(0.5)


def test_nplus_24_aggregation_modes_on_ragged_mask():
    # per-token [[1, 2, 3], [4, pad, pad]]:
    #   token-mean          (1 + 2 + 3 + 4) / 4         = 2.5
    #   seq-mean-token-sum  (6 + 4) / 2                 = 5.0
    #   seq-mean-token-mean (6/3 + 4/1) / 2 = (2 + 4)/2 = 3.0
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = _mask([3, 1], 3)
    assert aggregate_loss(x, mask, "token-mean").item() == 2.5
    assert aggregate_loss(x, mask, "seq-mean-token-sum").item() == 5.0
    assert aggregate_loss(x, mask, "seq-mean-token-mean").item() == 3.0
    # micro-batches of one row with the minibatch's counts sum to the minibatch value
    for mode, full in [("token-mean", 2.5), ("seq-mean-token-sum", 5.0), ("seq-mean-token-mean", 3.0)]:
        parts = sum(aggregate_loss(x[i : i + 1], mask[i : i + 1], mode, num_tokens=4, num_sequences=2).item() for i in range(2))
        assert parts == pytest.approx(full)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(x, mask, "sum")


def test_nplus_24_grpo_loss_hand_worked():
    # ratio 1 (logp == old), A = [+1, -1], lengths [2, 1], kl_coef 0.05, k3:
    #   row 0: pg [-1, -1], d = logp - ref = [0, 0.5] -> k3 [0, 0.106531]
    #   row 1: pg [+1],     d = [-0.5]             -> k3 [0.148721]
    #   per token: row 0 [-1, -1 + 0.05 * 0.106531], row 1 [1 + 0.05 * 0.148721]
    #   seq-mean-token-mean: ((-2 + 0.0053265) / 2 + 1.0074361) / 2 = 0.0050497
    logp = torch.tensor([[-1.0, -1.0], [-2.0, -7.0]])
    ref = torch.tensor([[-1.0, -1.5], [-1.5, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])  # per token, 0 on row 1's padding
    k3a, k3b = math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5
    loss, m = grpo_loss(logp, logp.clone(), ref, adv, _mask([2, 1], 2), kl_coef=0.05)
    expected = ((-2 + 0.05 * k3a) / 2 + (1 + 0.05 * k3b)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["kl"].item() == pytest.approx((k3a + k3b) / 3, abs=1e-6)
    assert m["clipfrac"].item() == 0.0
    # token-mean of the same tokens: (-1 - 1 + 0.0053265 + 1.0074361) / 3
    loss_tm, _ = grpo_loss(logp, logp.clone(), ref, adv, _mask([2, 1], 2), kl_coef=0.05, aggregation="token-mean")
    assert loss_tm.item() == pytest.approx((-1 + 0.05 * (k3a + k3b)) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="per token"):
        grpo_loss(logp, logp, ref, torch.tensor([1.0, -1.0]), _mask([2, 1], 2))


def test_rloo_loss_is_reinforce_at_ratio_one():
    # A = [2, -1], ratio 1: loss = -(2 - 1) / 2 = -0.5; d loss / d logp_{b,t} = -A_b / B on real tokens
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    loss, m = rloo_loss(logp, logp.detach().clone(), torch.tensor([2.0, -1.0]), _mask([3, 2], 3))
    loss.backward()
    assert loss.item() == pytest.approx(-0.5)
    assert logp.grad.tolist() == [[-1.0, -1.0, -1.0], [0.5, 0.5, 0.0]]
    assert m["ratio_mean"].item() == 1.0


def test_rloo_loss_clips_the_sequence_ratio():
    # sequence log-ratio 0.3 + 0.2 = 0.5 -> rho = 1.6487; A = +1, clip 0.2: max(-1.6487, -1.2) = -1.2
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.3, 0.2, 5.0]])
    loss, m = rloo_loss(logp, old, torch.tensor([1.0]), _mask([2], 3), clip_range=0.2)
    assert loss.item() == pytest.approx(-1.2) and m["clipfrac"].item() == 1.0
    loss, _ = rloo_loss(logp, old, torch.tensor([1.0]), _mask([2], 3), clip_range=None)
    assert loss.item() == pytest.approx(-math.exp(0.5), abs=1e-6)
