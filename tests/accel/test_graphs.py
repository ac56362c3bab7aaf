"""CUDA-graphed training steps (milbench.step_graphs): the same gradients and weights as eager steps.

The graph tests need a CUDA GPU and are skipped elsewhere; the device machine runs them (docs/performance.md).
"""

from dataclasses import replace
from functools import partial

import pytest
import torch

from milbench.bench.bags import parse_bag, random_bag
from milbench.training.device import DeviceBagStore
from milbench.training.device import float_bag as _as_float
from milbench.training.steps import bag_loss, bag_step, train_epoch
from milbench.models.registry import create_model
from milbench.accel.graphs import StepGraphs, can_graph, graph_key
from milbench.survival.losses import get_loss

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
GRAPHED = ["amil", "dsmil", "transmil", "crossfusion", "crossfusion_concat", "crossfusion_single"]
SIZE = "40,160,640"  # 5x / 10x / 20x patches: small, but grids of 13 x 13 and the real code paths


def test_graph_key_names_where_a_bag_lies():
    bag = random_bag("crossfusion", parse_bag("4,12,40"), 8, torch.device("cpu"))
    assert graph_key(bag) == graph_key(replace(bag, features=dict(bag.features)))  # same tensors, same key
    moved = replace(bag, features={k: v.clone() for k, v in bag.features.items()})
    assert graph_key(moved) != graph_key(bag)  # a copy lies elsewhere: a graph of the original cannot read it


def test_only_cuda_and_declared_models_are_graphed():
    assert not can_graph(create_model("crossfusion", in_dim=8), torch.device("cpu"))
    assert not can_graph(create_model("patchgcn", in_dim=8), torch.device("cuda"))  # builds graphs on the host
    assert can_graph(create_model("crossfusion", in_dim=8), torch.device("cuda"))


def test_device_store_says_which_bags_it_keeps():
    store = DeviceBagStore(torch.device("cpu"))
    bag = random_bag("amil", parse_bag("4,12,40"), 8, torch.device("cpu"))
    store.fetch("a", lambda: bag)
    assert not store.resident("a")  # the CPU keeps nothing: the feature cache holds the bags
    assert not store.resident("missing")


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


@cuda
@pytest.mark.parametrize("name", GRAPHED)
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_a_replayed_step_gives_the_eager_gradients(name, amp):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = create_model(name, in_dim=32).to(dev).eval()  # eval: no dropout, so both paths draw nothing
    bags = [random_bag(name, parse_bag(SIZE), 32, dev, seed=s) for s in (0, 1)]
    loss_fn = get_loss("nll", alpha=0.2)
    labels = [(torch.tensor([1], device=dev), torch.tensor([0.0], device=dev)),
              (torch.tensor([3], device=dev), torch.tensor([1.0], device=dev))]
    graphs = StepGraphs(model, dev)
    for rnd in range(3):  # eager (warm-up), captured and replayed, replayed
        for bag, (y, c) in zip(bags, labels):
            loss = bag_loss(model, _as_float(bag), y, c, loss_fn, amp)
            expected = torch.autograd.grad(loss, list(model.parameters()))  # leaves .grad where the graphs write
            eager_loss = loss.detach()
            del loss  # a live autograd graph would tie its gradient accumulators to this stream
            model.zero_grad(set_to_none=False)
            graphs.take_loss()
            graphs.run(graph_key(bag), y, c, partial(bag_step, model, bag, loss_fn, amp, 1))
            torch.testing.assert_close(graphs.take_loss(), eager_loss, rtol=1e-4, atol=1e-5)
            for g, e in zip(_grads(model), expected):
                torch.testing.assert_close(g, e, rtol=2e-2 if amp else 1e-4, atol=2e-3 if amp else 1e-6)  # bf16
    stats = graphs.stats()
    assert stats["off"] is None and stats["graphs"] == 2 and stats["replayed"] == 3, stats  # bag 0 warmed up


class _Bags:
    def __init__(self, bags):
        self.bags = bags

    def get(self, i, as_float=True):
        return _as_float(self.bags[i]) if as_float else self.bags[i]

    def resident(self, i):
        return True


def _train(name, graphs, epochs=3):
    """Bags of five sizes: each graph records a new shape (new cuFFT plans for TransMIL's residual convolution)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = create_model(name, in_dim=32).to(dev).eval()
    sizes = [f"{10 + s},{40 + s},{160 + 7 * s}" for s in range(5)]
    bags = _Bags([random_bag(name, parse_bag(size), 32, dev, seed=s) for s, size in enumerate(sizes)])
    y = torch.tensor([0, 1, 2, 3, 1], device=dev)
    c = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0], device=dev)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the gradients: last-bit differences stay small
    step_graphs = StepGraphs(model, dev) if graphs else None
    losses = [train_epoch(model, bags, [4, 0, 3, 1, 2], y, c, get_loss("nll"), optim, 2, graphs=step_graphs)
              for _ in range(epochs)]
    return model, torch.stack(losses), step_graphs


@cuda
@pytest.mark.parametrize("name", ["amil", "transmil", "crossfusion"])
def test_graphed_epochs_end_at_the_eager_weights(name):
    eager, eager_losses, _ = _train(name, graphs=False)
    graphed, graphed_losses, step_graphs = _train(name, graphs=True)
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for p, q in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)
    stats = step_graphs.stats()
    assert stats["off"] is None and stats["graphs"] == 5 and stats["replayed"] == 9, stats  # the first bag warmed up


@cuda
def test_gradients_set_to_none_drop_the_graphs_instead_of_writing_to_freed_memory():
    dev = torch.device("cuda")
    model = create_model("amil", in_dim=32).to(dev).eval()
    bags = [random_bag("amil", parse_bag(SIZE), 32, dev, seed=s) for s in (0, 1)]
    y, c = torch.tensor([1], device=dev), torch.tensor([0.0], device=dev)
    graphs = StepGraphs(model, dev)
    for bag in bags + bags:
        graphs.run(graph_key(bag), y, c, partial(bag_step, model, bag, get_loss("nll"), None, 1))
    assert graphs.stats()["graphs"] == 2
    model.zero_grad(set_to_none=True)
    graphs.run(graph_key(bags[1]), y, c, partial(bag_step, model, bags[1], get_loss("nll"), None, 1))
    assert graphs.stats()["graphs"] == 0  # dropped; this step ran eagerly and gave the gradients new tensors
    expected = torch.autograd.grad(bag_loss(model, _as_float(bags[1]), y, c, get_loss("nll"), None),
                                   list(model.parameters()))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)


class _Syncing(torch.nn.Module):
    """Claims to be graph-safe but reads a value on the host every step: capture must fail, training go on."""

    cuda_graphs = True

    def __init__(self, in_dim, unused=False):
        super().__init__()
        self.head = torch.nn.Linear(in_dim, 4)
        self.unused = torch.nn.Linear(1, 1) if unused else None
        self.sync = not unused

    def forward(self, bag):
        x = bag.features["20x"].mean(0, keepdim=True)
        if self.sync and float(x.abs().sum()) < 0:  # a host synchronisation
            x = -x
        from milbench.models.layers.common import ModelOutput

        return ModelOutput(self.head(x))


@cuda
@pytest.mark.parametrize("unused", [False, True])
def test_models_that_cannot_be_graphed_train_eagerly_and_say_why(unused):
    dev = torch.device("cuda")
    model = _Syncing(8, unused).to(dev)
    bags = _Bags([random_bag("amil", parse_bag("4,12,40"), 8, dev, seed=s) for s in range(3)])
    y, c = torch.tensor([0, 1, 2], device=dev), torch.zeros(3, device=dev)
    graphs = StepGraphs(model, dev)
    optim = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(3):
        total = train_epoch(model, bags, [0, 1, 2], y, c, get_loss("nll"), optim, 3, graphs=graphs)
    expected = sum(bag_loss(model, bags.get(i), y[i:i + 1], c[i:i + 1], get_loss("nll"), None) for i in range(3))
    torch.testing.assert_close(total, expected.detach())
    stats = graphs.stats()
    assert stats["graphs"] == 0 and stats["replayed"] == 0 and stats["eager"] == 9
    assert ("no gradient" if unused else "capture failed") in stats["off"]
    # the failed capture left nothing behind: random numbers (dropout) and allocations work as before
    dropped = torch.nn.functional.dropout(torch.ones(1000, device=dev), 0.5, training=True)
    assert 0 < int((dropped == 0).sum()) < 1000
