"""A small learning check every model must pass: risk is carried by the fraction of marked regions in a bag.

Patients with more marked regions die sooner. A model that learns anything sensible ranks held-out patients
well above chance; one that does not (frozen, broken gradient, wrong pooling) stays near 0.5.
"""

from __future__ import annotations

import numpy as np
import torch
from sksurv.metrics import concordance_index_censored

from milbench.data.prepare import prepare_bag
from milbench.registry import create_model, get_card
from tests.conftest import nested_bag


def make_patients(n: int, n5: int, in_dim: int, seed: int, card) -> list[tuple]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        frac = rng.uniform()
        signal = (rng.uniform(size=n5) < frac).astype(np.float32)
        risk = signal.mean()
        time = float(np.exp(-2.5 * risk) * rng.uniform(0.8, 1.2))
        bag = prepare_bag(card, nested_bag(n5=n5, in_dim=in_dim, seed=seed * 1000 + i, signal=signal, case_id=str(i)))
        out.append((bag, time, risk))
    return out


def held_out_c_index(name: str, epochs: int = 12, lr: float = 1e-3, in_dim: int = 16, n5: int = 4,
                     n_train: int = 48, n_test: int = 32, seed: int = 0, **hparams) -> float:
    """Train ``name`` with the discrete-time NLL on 4 quantile bins, return Harrell's C on held-out patients."""
    torch.manual_seed(seed)
    card = get_card(name)
    model = create_model(name, in_dim=in_dim, n_bins=4, **hparams)
    train = make_patients(n_train, n5, in_dim, seed, card)
    test = make_patients(n_test, n5, in_dim, seed + 1, card)
    times = np.array([t for _, t, _ in train])
    edges = np.quantile(times, [0.25, 0.5, 0.75])
    if hasattr(model, "fit_priors"):
        model.fit_priors([b for b, _, _ in train])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for bag, t, _ in train:
            y = int(np.searchsorted(edges, t))
            out = model(bag)
            h = torch.sigmoid(out.logits[0]).clamp(1e-7, 1 - 1e-7)
            log_s = torch.cumsum(torch.log1p(-h), 0)
            loss = -(torch.log(h[y]) + (log_s[y - 1] if y > 0 else 0.0))
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        risks = []
        for bag, _, _ in test:
            h = torch.sigmoid(model(bag).logits[0])
            risks.append(-torch.cumprod(1 - h, 0).sum().item())
    t_test = np.array([t for _, t, _ in test])
    return concordance_index_censored(np.ones(len(t_test), bool), t_test, np.array(risks))[0]
