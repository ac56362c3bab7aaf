"""Survival losses against hand computations, the spec's clamped reference formula, and statsmodels' Cox model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from statsmodels.duration.hazard_regression import PHReg

from milbench import MilbenchError
from milbench.survival.losses import (ce_loss, cox_loss, get_loss, hazards_to_survival, mdn_nll, mdn_survival, nll_loss, risk_and_survival, risk_from_logits)


def logit(p: list[float]) -> list[float]:
    return [math.log(q / (1 - q)) for q in p]


# Three patients, 4 bins, hazards chosen so the products are exact:
#   A: h = [.5, .25, .75, .5], S = [.5, .375, .09375, .046875], y = 1, uncensored
#   B: h = [.25, .5, .5, .5],  S = [.75, .375, .1875, .09375],  y = 2, censored
#   C: h = [.5, .5, .5, .5],   S = [.5, .25, .125, .0625],      y = 0, uncensored
LOGITS = torch.tensor([logit([.5, .25, .75, .5]), logit([.25, .5, .5, .5]), logit([.5, .5, .5, .5])],
                      dtype=torch.float64)
Y = torch.tensor([1, 2, 0])
C = torch.tensor([0.0, 1.0, 0.0])
# NLL per patient: A uncensored -(log S_0 + log h_1) = -log(.5 * .25) = 2.0794415
#                  B censored   -log S_2 = -log .1875 = 1.6739764
#                  C uncensored -(log S_{-1} + log h_0) = -log .5 = 0.6931472
NLL_A, NLL_B, NLL_C = 2.0794415417, 1.6739764336, 0.6931471806


def test_survival_and_risk_from_logits():
    s = hazards_to_survival(LOGITS)
    assert torch.allclose(s[0], torch.tensor([.5, .375, .09375, .046875], dtype=torch.float64))
    assert torch.allclose(risk_from_logits(LOGITS), -s.sum(1))


def test_nll_hand_computation_alpha_0():
    per = nll_loss(LOGITS, Y, C, alpha=0.0, reduction="none")
    assert torch.allclose(per, torch.tensor([NLL_A, NLL_B, NLL_C], dtype=torch.float64), atol=1e-8)
    assert nll_loss(LOGITS, Y, C, alpha=0.0).item() == pytest.approx((NLL_A + NLL_B + NLL_C) / 3, abs=1e-8)
    assert nll_loss(LOGITS, Y, C, reduction="sum").item() == pytest.approx(NLL_A + NLL_B + NLL_C, abs=1e-8)


def test_nll_hand_computation_alpha_02():
    # alpha only shrinks the censored term: (1 - .2) * (cens + unc) + .2 * unc; B is the only censored patient.
    expected = (NLL_A + 0.8 * NLL_B + NLL_C) / 3  # = 1.3705899
    assert nll_loss(LOGITS, Y, C, alpha=0.2).item() == pytest.approx(1.3705899, abs=1e-7)
    assert nll_loss(LOGITS, Y, C, alpha=0.2).item() == pytest.approx(expected, abs=1e-8)


def reference_nll(logits, y, c, alpha, eps=1e-7):
    """Spec section 0 written literally: hazards, cumprod survival, padded S_{-1} = 1, logs clamped at eps."""
    h = torch.sigmoid(logits)
    s = torch.cat([torch.ones(len(y), 1, dtype=h.dtype), torch.cumprod(1 - h, 1)], 1)
    y = y.view(-1, 1)
    c = c.view(-1, 1).to(h.dtype)
    unc = -(1 - c) * (s.gather(1, y).clamp(min=eps).log() + h.gather(1, y).clamp(min=eps).log())
    cens = -c * s.gather(1, y + 1).clamp(min=eps).log()
    return ((1 - alpha) * (cens + unc) + alpha * unc).mean()


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_nll_matches_clamped_reference(alpha):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4, generator=g) * 3
    y = torch.randint(0, 4, (64,), generator=g)
    c = (torch.rand(64, generator=g) < 0.5).float()
    exact = reference_nll(logits.double(), y, c.double(), alpha).item()
    # float32 from logits stays within 1e-6 of the exact value (the float32 cumprod reference drifts ~1e-6 here)
    assert nll_loss(logits, y, c, alpha=alpha).item() == pytest.approx(exact, abs=1e-6)
    assert nll_loss(logits.double(), y, c.double(), alpha=alpha).item() == pytest.approx(exact, abs=1e-12)


def test_nll_clamps_like_reference_and_keeps_finite_gradients():
    logits = torch.tensor([[40.0, 40.0, 40.0, 40.0], [-40.0, -40.0, -40.0, -40.0]], requires_grad=True)
    y, c = torch.tensor([3, 0]), torch.tensor([1.0, 0.0])
    loss = nll_loss(logits, y, c)
    # A: censored in the last bin with S_3 ~ e^-160 -> clamped to -log(1e-7); B: h_0 ~ e^-40 -> clamped too.
    assert loss.item() == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert loss.item() == pytest.approx(reference_nll(logits.detach(), y, c, 0.0).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_nll_gradient_finite_and_points_the_right_way():
    logits = torch.zeros(2, 4, requires_grad=True)
    nll_loss(logits, torch.tensor([1, 2]), torch.tensor([0.0, 1.0]), alpha=0.2).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 1] < 0 and logits.grad[0, 0] > 0  # uncensored in bin 1: raise h_1, lower h_0
    assert (logits.grad[1, :3] > 0).all() and logits.grad[1, 3] == 0  # censored in bin 2: lower h_0..h_2 only


def test_ce_hand_computation():
    # ce: A -log(1 - S_1) = -log .625 = 0.4700036, B -log S_2 = 1.6739764, C -log(1 - S_0) = -log .5 = 0.6931472
    # reg is the uncensored NLL term: A 2.0794415, B 0, C 0.6931472
    ce_a, ce_b, ce_c = 0.4700036292, 1.6739764336, 0.6931471806
    assert ce_loss(LOGITS, Y, C, alpha=0.0).item() == pytest.approx((ce_a + ce_b + ce_c) / 3, abs=1e-8)
    expected = (0.8 * ce_a + 0.2 * NLL_A + 0.8 * ce_b + 0.8 * ce_c + 0.2 * NLL_C) / 3  # = 0.9414065
    assert ce_loss(LOGITS, Y, C, alpha=0.2).item() == pytest.approx(expected, abs=1e-8)
    assert expected == pytest.approx(0.9414065, abs=1e-7)


def test_ce_finite_when_survival_is_certain():
    logits = torch.full((1, 4), -40.0, requires_grad=True)  # S_y == 1 in float32, uncensored: log(1 - S_y) clamps
    loss = ce_loss(logits, torch.tensor([0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(-math.log(1e-7), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_cox_hand_computation():
    # exp(risk) = 1, 2, 3. Event at t=1: risk set all -> 0 - log 6; event at t=3: risk set {3} -> 0. Mean over 2.
    risk = torch.tensor([0.0, math.log(2), math.log(3)], requires_grad=True)
    loss = cox_loss(risk, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 0, 1]))
    assert loss.item() == pytest.approx(math.log(6) / 2, abs=1e-6)
    loss.backward()
    # d/dr_0 = -(1 - 1/6) / 2 = -5/12: gradient descent raises the risk of the earliest death
    assert torch.allclose(risk.grad, torch.tensor([-5 / 12, 2 / 12, 3 / 12]), atol=1e-6)
    # Breslow ties: both deaths at t=1 share the full risk set: -(0 - log 6 + log 2 - log 6) / 2 = log(18) / 2
    tied = cox_loss(risk.detach(), torch.tensor([1.0, 1.0, 3.0]), torch.tensor([1, 1, 0]))
    assert tied.item() == pytest.approx(math.log(18) / 2, abs=1e-6)


def test_cox_matches_statsmodels_breslow_on_whas500():
    from sksurv.datasets import load_whas500

    x, y = load_whas500()
    covariates = x[["age", "bmi", "hr"]].to_numpy(float)
    time, event = y["lenfol"].copy(), y["fstat"].astype(float)
    beta = np.array([0.05, -0.03, 0.01])
    loglik = PHReg(time, covariates, status=event, ties="breslow").loglike(beta)  # data has tied times
    ours = cox_loss(torch.tensor(covariates @ beta), torch.tensor(time), torch.tensor(event))
    assert ours.item() * event.sum() == pytest.approx(-loglik, rel=1e-9)


def test_cox_degenerate_batches_give_zero_with_grad():
    risk = torch.tensor([0.3, -0.2], requires_grad=True)
    for r, t, e in [(risk[:1], torch.tensor([1.0]), torch.tensor([1])),
                    (risk, torch.tensor([1.0, 2.0]), torch.tensor([0, 0]))]:
        loss = cox_loss(r, t, e)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()


def test_get_loss_factory():
    nll = get_loss("nll", alpha=0.2)
    time = torch.tensor([3.0, 5.0, 1.0])
    assert nll(LOGITS, Y, C).item() == pytest.approx(nll_loss(LOGITS, Y, C, alpha=0.2).item())
    assert nll(LOGITS, Y, C, time).item() == pytest.approx(nll(LOGITS, Y, C).item())
    assert get_loss("ce", 0.2)(LOGITS, Y, C, time).item() == pytest.approx(ce_loss(LOGITS, Y, C, alpha=0.2).item())
    cox = get_loss("cox")
    assert cox.needs_batch and not nll.needs_batch
    expected = cox_loss(risk_from_logits(LOGITS), time, 1 - C)
    assert cox(LOGITS, Y, C, time).item() == pytest.approx(expected.item())
    with pytest.raises(MilbenchError, match="needs the survival times"):
        cox(LOGITS, Y, C)


def test_losses_and_read_outs_of_the_cox_and_mdn_heads():
    time = torch.tensor([3.0, 5.0, 1.0])
    log_risk = torch.tensor([[0.3], [-1.0], [2.0]], dtype=torch.float64)
    cox = get_loss("cox", head="cox")
    assert cox(log_risk, Y, C, time).item() == pytest.approx(cox_loss(log_risk[:, 0], time, 1 - C).item())
    risk, surv = risk_and_survival("cox", log_risk, np.array([0.0, 1.0, 2.0, 3.0, 4.0]))
    assert surv is None and np.allclose(risk, [0.3, -1.0, 2.0])
    params = torch.stack([torch.zeros(3, 4), torch.tensor([0.0, 1.0, 2.0, 3.0]).expand(3, 4), torch.ones(3, 4)], 1)
    params[0, 0, 0] = 5.0  # patient 0 puts its mass on the earliest component: the highest risk
    mdn = get_loss("mdn", head="mdn")
    assert mdn.needs_time and not mdn.needs_batch
    assert mdn(params, Y, C, time).item() == pytest.approx(mdn_nll(params, time, C).item())
    edges = np.array([0.0, 1.0, 2.0, 4.0, 8.0])
    risk, surv = risk_and_survival("mdn", params, edges)
    assert np.allclose(surv, mdn_survival(params, torch.tensor(edges[1:])).numpy(), atol=1e-6)
    assert np.allclose(risk, -surv.sum(1)) and risk[0] > risk[1] == pytest.approx(risk[2])
    risk, surv = risk_and_survival("hazard", LOGITS, edges)
    assert np.allclose(surv, hazards_to_survival(LOGITS).numpy()) and np.allclose(risk, -surv.sum(1))


def test_a_loss_must_fit_the_head():
    with pytest.raises(MilbenchError, match="loss=nll cannot train the model's cox head.*--set loss=cox"):
        get_loss("nll", head="cox")
    with pytest.raises(MilbenchError, match="loss=mdn cannot train the model's hazard head"):
        get_loss("mdn")
    with pytest.raises(MilbenchError, match="head kind"):
        get_loss("nll", head="poisson")


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(MilbenchError, match="unknown survival loss"):
        get_loss("hinge")
    with pytest.raises(MilbenchError, match="alpha"):
        get_loss("nll", alpha=1.5)
    with pytest.raises(MilbenchError, match="logits must be"):
        nll_loss(LOGITS[0], Y, C)
    with pytest.raises(MilbenchError, match="reduction"):
        nll_loss(LOGITS, Y, C, reduction="max")
    with pytest.raises(MilbenchError, match="cox loss"):
        cox_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3))
