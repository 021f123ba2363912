"""dpo_loss against hand-computed values (DPO eq. 7, conservative DPO, IPO eq. 17)."""

import math

import pytest
import torch

from tldr_rlhf.losses import dpo_loss


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    # h = (pi_c - ref_c) - (pi_r - ref_r) = 0  ->  -log sigmoid(0) = log 2 = 0.693147..., for any beta
    pi_c, pi_r = t(-12.5, -3.0, -40.0), t(-7.0, -9.25, -1.0)
    for beta in (0.05, 0.1, 1.0):
        loss, m = dpo_loss(pi_c, pi_r, pi_c.clone(), pi_r.clone(), beta=beta)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
        assert m["reward_margin"].item() == 0.0
        assert m["reward_accuracy"].item() == 0.0  # ties count as wrong


def test_dpo_loss_hand_computed():
    # pair 1: chosen ratio -10 - (-11) = 1, rejected ratio -12 - (-11) = -1, h = 2, beta h = 1
    #   loss = -log sigmoid(1) = log(1 + e^-1) = log(1.36787944) = 0.31326169
    # pair 2: chosen/rejected swapped -> beta h = -1, loss = log(1 + e) = 1.31326169
    # mean = (0.31326169 + 1.31326169) / 2 = 0.81326169
    loss, m = dpo_loss(t(-10.0, -12.0), t(-12.0, -10.0), t(-11.0, -11.0), t(-11.0, -11.0), beta=0.5)
    assert loss.item() == pytest.approx(0.81326169, abs=1e-8)
    # rewards beta * ratio: chosen (0.5, -0.5), rejected (-0.5, 0.5)
    assert m["chosen_reward"].item() == pytest.approx(0.0)
    assert m["reward_margin"].item() == pytest.approx(0.0)  # (1 + -1) / 2
    assert m["reward_accuracy"].item() == 0.5
    assert m["logps_chosen"].item() == pytest.approx(-11.0)
    one, m1 = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.5)
    assert one.item() == pytest.approx(0.31326169, abs=1e-8)
    assert (m1["chosen_reward"].item(), m1["rejected_reward"].item(), m1["reward_margin"].item()) == (0.5, -0.5, 1.0)
    assert m1["reward_accuracy"].item() == 1.0


def test_dpo_loss_gradient_hand_computed():
    # d/d pi_c [-log sigmoid(beta h)] = -beta * sigmoid(-beta h); at h = 0, beta = 0.1: -0.1 * 0.5 = -0.05
    # and +0.05 for pi_r; averaged over a batch of 2 -> -0.025 / +0.025
    pi_c, pi_r = t(-5.0, -6.0).requires_grad_(), t(-4.0, -8.0).requires_grad_()
    loss, _ = dpo_loss(pi_c, pi_r, t(-5.0, -6.0), t(-4.0, -8.0), beta=0.1)
    loss.backward()
    assert pi_c.grad.tolist() == pytest.approx([-0.025, -0.025])
    assert pi_r.grad.tolist() == pytest.approx([0.025, 0.025])


def test_nplus_26_dpo_conservative_label_smoothing():
    # beta h = 1, eps = 0.1: 0.9 * (-log sigmoid(1)) + 0.1 * (-log sigmoid(-1))
    #   = 0.9 * 0.31326169 + 0.1 * 1.31326169 = 0.28193552 + 0.13132617 = 0.41326169
    loss, _ = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.41326169, abs=1e-8)
    # at h = 0 the smoothed loss is still log 2 (0.9 log 2 + 0.1 log 2)
    z = t(-3.0)
    assert dpo_loss(z, z, z, z, beta=0.1, label_smoothing=0.1)[0].item() == pytest.approx(math.log(2))
    # conservative DPO has a finite optimum: the gradient in h vanishes where sigmoid(beta h) = 1 - eps,
    # i.e. beta h = log(0.9 / 0.1) = 2.19722458
    h = torch.tensor([math.log(9.0) / 0.5], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    dpo_loss(h, zero, zero, zero, beta=0.5, label_smoothing=0.1)[0].backward()
    assert h.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_nplus_26_ipo_loss():
    # IPO (Azar et al. eq. 17): (h - 1 / (2 beta))^2 with h = 2, beta = 0.5 -> (2 - 1)^2 = 1
    loss, m = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx(1.0)
    assert m["reward_margin"].item() == pytest.approx(1.0)
    # per-token form: ratios 1 / 2 tokens = 0.5 and -1 / 4 tokens = -0.25 -> (0.75 - 1)^2 = 0.0625
    loss, _ = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.5, loss_type="ipo", chosen_lengths=t(2.0), rejected_lengths=t(4.0))
    assert loss.item() == pytest.approx(0.0625)
    # policy == reference: (0 - 1 / (2 * 0.1))^2 = 25
    z = t(-3.0, -4.0)
    assert dpo_loss(z, z, z, z, beta=0.1, loss_type="ipo")[0].item() == pytest.approx(25.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta=0.0),
        dict(beta=0.1, label_smoothing=0.5),
        dict(beta=0.1, label_smoothing=-0.1),
        dict(beta=0.1, loss_type="hinge"),
        dict(beta=0.1, loss_type="ipo", label_smoothing=0.1),
        dict(beta=0.1, loss_type="ipo", chosen_lengths=t(2.0)),
    ],
)
def test_dpo_loss_rejects_bad_arguments(kwargs):
    z = t(-1.0)
    with pytest.raises(ValueError, match="dpo_loss"):
        dpo_loss(z, z, z, z, **kwargs)
