"""Hand-worked checks of tldr_rlhf.advantages (KL-shaped rewards, GAE, whitening, GRPO group
advantages, RLOO baselines, statistical rejection sampling)."""

import math

import pytest
import torch

from tldr_rlhf.advantages import (
    broadcast_over_response,
    explained_variance,
    gae,
    group_advantages,
    group_std,
    kl_shaped_rewards,
    rloo_advantages,
    rloo_baselines,
    sequence_advantages,
    sequence_rlhf_rewards,
    statistical_rejection_sampling,
    tied_groups,
    whiten_advantages,
    whiten_rewards,
)
from tldr_rlhf.ops import lengths_to_mask


def _mask(lengths, t):
    return lengths_to_mask(torch.tensor(lengths), t)


def test_nplus_20_score_at_last_real_token_and_none_after_eos():
    # Row 0: 3 real tokens (EOS at index 2); row 1: 2 real tokens (EOS at index 1).
    # log pi - log pi_ref = [0.2, -0.4, 1.0, (9.0 pad)] and [0.6, 0.0, (7.0, 7.0 pad)]; kl_coef 0.05.
    # row 0: [-0.05*0.2, +0.05*0.4, -0.05*1.0 + 2.0, 0] = [-0.01, 0.02, 1.95, 0]
    # row 1: [-0.05*0.6, 0 + 1.0, 0, 0]               = [-0.03, 1.00, 0,    0]
    ref = torch.full((2, 4), -2.0)
    logprobs = ref + torch.tensor([[0.2, -0.4, 1.0, 9.0], [0.6, 0.0, 7.0, 7.0]])
    rewards, m = kl_shaped_rewards(torch.tensor([2.0, 1.0]), logprobs, ref, _mask([3, 2], 4), kl_coef=0.05)
    torch.testing.assert_close(rewards, torch.tensor([[-0.01, 0.02, 1.95, 0.0], [-0.03, 1.0, 0.0, 0.0]]))
    # non-score reward = -0.05 * sum of real-token KL: row 0 -0.05*0.8 = -0.04, row 1 -0.05*0.6 = -0.03
    torch.testing.assert_close(m["non_score_reward"], torch.tensor([-0.04, -0.03]))
    torch.testing.assert_close(m["kl_sum"], torch.tensor([0.8, 0.6]))


def test_nplus_20_response_without_eos_gets_score_at_its_last_token():
    # A response with no EOS is real on all T tokens: the (penalty) score lands on token T-1.
    z = torch.zeros(1, 3)
    rewards, _ = kl_shaped_rewards(torch.tensor([-1.0]), z, z, _mask([3], 3), kl_coef=0.05)
    assert rewards.tolist() == [[0.0, 0.0, -1.0]]


def test_nplus_24_kl_shaping_with_k3_option():
    # d = log pi - log pi_ref = 0.5: k3 = exp(-0.5) + 0.5 - 1 = 0.106531; reward = -0.1 * 0.106531
    lp, ref = torch.tensor([[0.0]]), torch.tensor([[-0.5]])
    rewards, _ = kl_shaped_rewards(torch.tensor([0.0]), lp, ref, _mask([1], 1), kl_coef=0.1, kl_estimator="k3")
    assert rewards.item() == pytest.approx(-0.1 * (math.exp(-0.5) - 0.5), abs=1e-7)


def test_kl_shaped_rewards_rejects_bad_masks():
    z = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="prefix"):
        kl_shaped_rewards(torch.zeros(1), z, z, torch.tensor([[True, False, True]]), kl_coef=0.05)
    with pytest.raises(ValueError, match="no real response token"):
        kl_shaped_rewards(torch.zeros(1), z, z, torch.tensor([[False, False, False]]), kl_coef=0.05)
    with pytest.raises(ValueError, match="bool"):
        kl_shaped_rewards(torch.zeros(1), z, z, torch.ones(1, 3), kl_coef=0.05)


def test_nplus_16_gae_hand_worked():
    # gamma 1, lambda 0.95. Row 0 (3 real): rewards [0, 0, 1], values [0.5, 0.6, 0.7]
    #   d2 = 1 + 0 - 0.7 = 0.3                 A2 = 0.3
    #   d1 = 0 + 0.7 - 0.6 = 0.1               A1 = 0.1 + 0.95 * 0.3 = 0.385
    #   d0 = 0 + 0.6 - 0.5 = 0.1               A0 = 0.1 + 0.95 * 0.385 = 0.46575
    #   returns = A + V = [0.96575, 0.985, 1.0]
    # Row 1 (2 real, value 99 on the pad must not leak): rewards [0, 2], values [1, 1]
    #   d1 = 2 + 0 - 1 = 1 (terminal: V after the last real token is 0)   A1 = 1
    #   d0 = 0 + 1 - 1 = 0                     A0 = 0.95
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 99.0]])
    adv, ret = gae(rewards, values, _mask([3, 2], 3), gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.46575, 0.385, 0.3], [0.95, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0], [1.95, 2.0, 0.0]]))


def _gae_loop(rewards, values, length, gamma, lam):
    """Step-by-step GAE of one sequence with plain Python floats."""
    adv = [0.0] * length
    last = 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_nplus_16_gae_matches_step_by_step_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 4, 10, 3]
    rewards, values = torch.randn(5, 10, generator=g, dtype=torch.float64), torch.randn(5, 10, generator=g, dtype=torch.float64)
    adv, ret = gae(rewards, values, _mask(lengths, 10), gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        expected = _gae_loop(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert adv[b, :n].tolist() == pytest.approx(expected, abs=1e-12)
        assert ret[b, :n].tolist() == pytest.approx([a + v for a, v in zip(expected, values[b, :n].tolist())], abs=1e-12)
        assert adv[b, n:].abs().sum() == 0 and ret[b, n:].abs().sum() == 0


def test_nplus_22_advantages_whitened_over_real_tokens():
    # Real values 1, 2, 3 | 5 (pads 100 ignored): mean 2.75, unbiased var (1.75^2 + 0.75^2 + 0.25^2 +
    # 2.25^2) / 3 = 8.75 / 3, std 1.707825; whitened first token -1.75 / 1.707825 = -1.024695.
    adv = torch.tensor([[1.0, 2.0, 3.0], [5.0, 100.0, 100.0]])
    mask = _mask([3, 1], 3)
    w = whiten_advantages(adv, mask)
    assert w[0, 0].item() == pytest.approx(-1.75 / math.sqrt(8.75 / 3), abs=1e-6)
    assert w[1, 1:].tolist() == [0.0, 0.0]
    real = w[mask]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.std().item() == pytest.approx(1.0, abs=1e-6)


def test_nplus_22_reward_whitening_keeps_mean():
    r = torch.tensor([[1.0, 3.0], [5.0, -7.0]])
    mask = _mask([2, 1], 2)
    w = whiten_rewards(r, mask)
    # real 1, 3, 5: mean 3, unbiased var 4 -> (x - 3) / 2 + 3 = [2, 3, 4]; pad -> 0
    torch.testing.assert_close(w, torch.tensor([[2.0, 3.0], [4.0, 0.0]]), atol=1e-6, rtol=0)


def test_nplus_24_group_advantages_with_and_without_std():
    # rewards [1, 0]: mean 0.5, unbiased std sqrt(0.5) = 0.70711 -> 0.5 / 0.70711 = +-0.70711
    a = group_advantages(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(a, torch.tensor([[0.70711, -0.70711]]), atol=1e-5, rtol=0)
    # Dr. GRPO (no std division): +-0.5
    assert group_advantages(torch.tensor([[1.0, 0.0]]), scale_by_std=False).tolist() == [[0.5, -0.5]]
    # [1, 2, 6]: mean 3, std sqrt((4 + 1 + 9) / 2) = sqrt(7) -> [-2, -1, 3] / 2.645751
    a = group_advantages(torch.tensor([[1.0, 2.0, 6.0], [4.0, 4.0, 4.0]]))
    torch.testing.assert_close(a[0], torch.tensor([-2.0, -1.0, 3.0]) / math.sqrt(7), atol=1e-5, rtol=0)
    assert a[1].tolist() == [0.0, 0.0, 0.0]  # a group that scores alike gets no signal (and no NaN)


def test_nplus_25_global_normalization_after_group_normalization():
    # group step: [[+0.70711, -0.70711], [0, 0]]; global mean 0, unbiased std sqrt(1/3) = 0.57735
    # -> [[1.22474, -1.22474], [0, 0]]
    a = group_advantages(torch.tensor([[1.0, 0.0], [3.0, 3.0]]), global_normalize=True)
    torch.testing.assert_close(a, torch.tensor([[1.22474, -1.22474], [0.0, 0.0]]), atol=1e-4, rtol=0)


def test_group_advantages_rejects_groups_of_one():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.tensor([[1.0], [2.0]]))


def test_rloo_baselines_hand_worked_and_loop():
    # [1, 2, 6]: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5; advantages -3, -1.5, 4.5
    r = torch.tensor([[1.0, 2.0, 6.0]])
    assert rloo_baselines(r).tolist() == [[4.0, 3.5, 1.5]]
    assert rloo_advantages(r).tolist() == [[-3.0, -1.5, 4.5]]
    g = torch.Generator().manual_seed(1)
    r = torch.randn(3, 4, generator=g, dtype=torch.float64)
    base = rloo_baselines(r)
    for b in range(3):
        for i in range(4):
            others = [r[b, j].item() for j in range(4) if j != i]
            assert base[b, i].item() == pytest.approx(sum(others) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_baselines(torch.ones(2, 1))


@pytest.mark.parametrize("value", [1.7, 2.3456789])
@pytest.mark.parametrize("g", [4, 8])
def test_group_advantages_tied_group_is_exactly_zero(value, g):
    # G equal float32 scores that are not exact binary fractions: the float32 mean of 8 x 1.7 is
    # not 1.7, and (r - mean) / (std + 1e-6) with both ~1e-7 gave +0.106 (+0.19 at 2.3456789) to
    # every member. A tied group has no signal: exactly 0, with and without the std division, and
    # it does not move the other group's values under global normalization.
    r = torch.tensor([[value] * g, [1.0] + [0.0] * (g - 1)])
    for kw in ({}, {"scale_by_std": False}):
        a = group_advantages(r, **kw)
        assert a.dtype == torch.float32 and torch.equal(a[0], torch.zeros(g))
    # the other group: mean 1/g, std sqrt(1/g) (unbiased: ((1 - 1/g)^2 + (g - 1)/g^2) / (g - 1) = 1/g)
    torch.testing.assert_close(group_advantages(r)[1, 0], torch.tensor((1 - 1 / g) * math.sqrt(g)), atol=1e-4, rtol=0)
    assert torch.equal(group_advantages(r[:1], global_normalize=True), torch.zeros(1, g))
    # a batch of one tied group (the float32 layout that gave +0.106 / +0.19)
    assert torch.equal(group_advantages(r[:1]), torch.zeros(1, g))
    # the same for float64 input (ties detected on the values, not on a computed std)
    assert torch.equal(group_advantages(r.double())[0], torch.zeros(g))


def test_tied_groups_decided_on_values():
    # max == min exactly; a group 1 ulp apart is not tied; float64 std of a tied group is exactly 0
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor(1.7, dtype=dtype)
        up = torch.nextafter(x, torch.tensor(2.0, dtype=dtype))
        r = torch.stack([x.repeat(8), torch.cat([x.repeat(7), up[None]])])
        assert tied_groups(r).tolist() == [True, False]
        assert group_std(r)[0].item() == 0.0 and group_std(r)[1].item() > 0


@pytest.mark.parametrize("value", [1.7, 2.3456789])
@pytest.mark.parametrize("g", [4, 8])
def test_rloo_tied_group_advantage_is_exactly_zero(value, g):
    # float32 (sum - r) / (k - 1) of k x 1.7 left +-1.2e-7 as the advantage; a tied group's baseline
    # is the reward itself. Dtype kept; the untied group keeps the leave-one-out mean.
    for dtype in (torch.float32, torch.float64):
        r = torch.tensor([[value] * g, [float(g - 1)] + [0.0] * (g - 1)], dtype=dtype)
        assert rloo_baselines(r).dtype == dtype
        assert torch.equal(rloo_baselines(r)[0], r[0])
        assert torch.equal(rloo_advantages(r)[0], torch.zeros(g, dtype=dtype))
        # untied: baselines 0 for the first, (g - 1) / (g - 1) = 1 for the others
        assert rloo_baselines(r)[1].tolist() == [0.0] + [1.0] * (g - 1)


def test_sequence_advantages_broadcast_over_the_response_and_back():
    # one value per sequence on its real tokens (lengths 3, 1, 2 of T = 4), exactly 0 on padding
    mask = _mask([3, 1, 2], 4)
    seq = torch.tensor([1.7, -0.3, 0.9])
    adv = broadcast_over_response(seq, mask)
    assert adv.shape == (3, 4) and adv.dtype == torch.float32
    expected = torch.tensor([[1.7, 1.7, 1.7, 0.0], [-0.3, 0.0, 0.0, 0.0], [0.9, 0.9, 0.0, 0.0]])
    assert torch.equal(adv, expected)
    assert not torch.signbit(adv[1, 1:]).any()  # +0, not -0.3 * 0 = -0.0, after a negative advantage
    assert torch.equal(sequence_advantages(adv, mask), seq)
    with pytest.raises(ValueError, match="shape"):
        broadcast_over_response(seq[:2], mask)
    # a per-token estimator's advantages have no one value per sequence
    with pytest.raises(ValueError, match="differ"):
        sequence_advantages(adv * torch.linspace(1.3, 0.2, 4), mask)
    # padding may hold anything: only the real tokens are read
    assert torch.equal(sequence_advantages(adv + 5.0 * ~mask, mask), seq)
    with pytest.raises(ValueError, match="no real response token"):
        sequence_advantages(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool))


def test_rloo_kl_in_the_reward():
    # score 1.0, per-token k1 [0.5, 1.5, (pad 9)] -> 1.0 - 0.1 * 2.0 = 0.8
    ref = torch.zeros(1, 3)
    lp = torch.tensor([[0.5, 1.5, 9.0]])
    r, m = sequence_rlhf_rewards(torch.tensor([1.0]), lp, ref, _mask([2], 3), kl_coef=0.1)
    assert r.item() == pytest.approx(0.8) and m["kl_sum"].item() == pytest.approx(2.0)


def test_nplus_25_rejection_sampling_small_beta_keeps_top_scores():
    # beta -> 0: each round accepts only the best remaining candidate (exp(0) = 1 > u; others ~0)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7])
    kept = statistical_rejection_sampling(scores, 3, beta=1e-4, generator=torch.Generator().manual_seed(0))
    assert kept.tolist() == [1, 4, 2]


def test_nplus_25_rejection_sampling_acceptance_probability():
    # Two candidates, keep 1, scores [0, ln 2], beta 1. Candidate 0 is visited first and accepted with
    # probability exp((0 - ln 2) / 1) = 0.5; otherwise candidate 1 (the max) is accepted.
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([[0.0, math.log(2.0)]]).expand(4000, 2)
    kept = statistical_rejection_sampling(scores, 1, beta=1.0, generator=g)
    share0 = (kept[:, 0] == 0).float().mean().item()
    assert abs(share0 - 0.5) < 0.03  # 4000 draws: std 0.0079


def test_nplus_25_rejection_sampling_keeps_count_and_favours_high_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.linspace(-2.0, 2.0, 64)[torch.randperm(64, generator=g)]
    kept = statistical_rejection_sampling(scores.expand(200, 64), 8, beta=0.5, generator=g)
    assert kept.shape == (200, 8)
    assert all(len(set(row)) == 8 for row in kept.tolist())  # without replacement
    kept_scores = scores[kept]
    assert kept_scores.mean().item() > 1.0  # all-candidate mean is 0
    # a large beta accepts nearly every candidate it visits: the first 8 in sampling order, i.e. a
    # uniform draw when (as from sampling) the candidates are exchangeable
    wide = statistical_rejection_sampling(scores.expand(20, 64), 8, beta=1e6, generator=g)
    assert all(row == list(range(8)) for row in wide.tolist())
    with pytest.raises(ValueError, match="num_keep"):
        statistical_rejection_sampling(scores, 65, beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        statistical_rejection_sampling(scores, 2, beta=0.0)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = _mask([3], 4)
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.0), ret, mask).item() == pytest.approx(0.0)
    # values [1, 1, 1]: residual [0, 1, 2], var 2/3 vs returns var 2/3 -> 0; values [3, 2, 1]: residual
    # [-2, 0, 2], var 8/3 -> 1 - 4 = -3
    assert explained_variance(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), ret, mask).item() == pytest.approx(-3.0)
