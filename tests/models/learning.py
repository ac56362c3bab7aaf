"""A small learning check every model must pass: risk is carried by the fraction of marked regions in a bag.

Patients with more marked regions die sooner. A model that learns anything sensible ranks held-out patients
well above chance; one that does not (frozen, broken gradient, wrong pooling) stays near 0.5.
"""

from __future__ import annotations

import numpy as np
import torch
from sksurv.metrics import concordance_index_censored

from milbench.training.prepare import prepare_bag
from milbench.training.contracts import head_kind
from milbench.training.steps import train_epoch
from milbench.models.registry import create_model, get_card
from milbench.survival.losses import get_loss, loss_for_head, risk_and_survival
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


class BagList:
    """Bags by index, as the engine's epoch loop reads them (``get(i, as_float)``)."""

    def __init__(self, bags: list) -> None:
        self.bags = bags

    def get(self, i: int, as_float: bool = True):
        return self.bags[i]


def held_out_c_index(name: str, epochs: int = 12, lr: float = 1e-3, in_dim: int = 16, n5: int = 4,
                     n_train: int = 48, n_test: int = 32, seed: int = 0, loss: str | None = None,
                     grad_accum: int = 1, **hparams) -> float:
    """Train ``name`` with the engine's epoch loop, return Harrell's C on held-out patients.

    The loss is the one the engine uses for the model's head (``loss`` or the head's default): the discrete-time
    NLL (alpha 0) on 4 quantile bins for the hazard head, plus every task output and the auxiliary loss; the Cox
    loss over windows of ``grad_accum`` bags for a cox head; the mixture NLL on the times for an mdn head. Adam steps
    every ``grad_accum`` bags; all patients have an event.
    """
    torch.manual_seed(seed)
    card = get_card(name)
    model = create_model(name, in_dim=in_dim, n_bins=4, **hparams)
    train = make_patients(n_train, n5, in_dim, seed, card)
    test = make_patients(n_test, n5, in_dim, seed + 1, card)
    times = np.array([t for _, t, _ in train])
    edges = np.quantile(times, [0.25, 0.5, 0.75])
    if hasattr(model, "fit_priors"):
        model.fit_priors([b for b, _, _ in train])
    head = head_kind(model)
    loss_fn = get_loss(loss_for_head(head, loss), head=head)
    y = torch.as_tensor(np.searchsorted(edges, times))
    t = torch.as_tensor(times, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    bags = BagList([b for b, _, _ in train])
    for _ in range(epochs):
        model.train()
        train_epoch(model, bags, list(range(n_train)), y, torch.zeros(n_train), loss_fn, opt, grad_accum, months=t)
    model.eval()
    with torch.no_grad():
        outputs = torch.cat([model(bag).logits for bag, _, _ in test])
    all_edges = np.concatenate([[times.min() - 1e-6], edges, [times.max() + 1e-6]])
    risks, _ = risk_and_survival(head, outputs, all_edges)
    t_test = np.array([t for _, t, _ in test])
    return concordance_index_censored(np.ones(len(t_test), bool), t_test, risks)[0]
