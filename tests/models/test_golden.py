"""Golden outputs of the authors' code (scripts/golden_outputs.py): milbench's models compute the same functions.

Each fixture in tests/fixtures/golden holds the authors' model's weights mapped to milbench's parameter names, a few
small bags with what the model needs, and the authors' outputs: eval logits (float64 and float32) and the gradients
of <logits, cotangent> with respect to every input feature tensor (float64), plus training-path quantities for
ZoomMIL (perturbed top-k with recorded noise), CS-MIL (bag sampling of the authors' data loader) and SCMIL (k-means
input). The reference parameter count at input width 1024 comes from the authors' code too.
"""

from __future__ import annotations

import inspect
import io
import lzma
import os
import sys
from pathlib import Path

import pytest
import torch

from milbench.data.bag import Bag
from milbench.models.registry import create_model

FIXTURES = Path(os.environ.get("MILBENCH_GOLDEN", Path(__file__).resolve().parents[1] / "fixtures" / "golden"))
NAMES = sorted(p.name[: -len(".pt.xz")] for p in FIXTURES.glob("*.pt.xz"))

# float64: every layer keeps float64 inputs in float64 (half precision is raised to float32 for softmaxes and sums by
# layers.common.upcast), so a float64 run agrees with the authors' to 2.2e-15; DSMIL's references take sqrt(128) in
# float32 even in a float64 run (6e-9 relative).
TOL64 = dict(rtol=1e-11, atol=1e-13)
TOL64_EXACT = dict(rtol=1e-11, atol=1e-13)
TOL32 = dict(rtol=2e-4, atol=2e-5)
TOL64_BY_FIXTURE = {"dsmil": dict(rtol=2e-8, atol=1e-9)}
# training path: milbench's top-k runs in float32 (scores.float()), the authors' in float64
TOL_TRAIN = dict(rtol=1e-11, atol=1e-13)

_CACHE: dict[str, dict] = {}


def load(name: str) -> dict:
    if name not in _CACHE:
        raw = lzma.decompress((FIXTURES / f"{name}.pt.xz").read_bytes())
        _CACHE[name] = torch.load(io.BytesIO(raw), weights_only=True)
    return _CACHE[name]


def cases(mode: str) -> list:
    out = []
    for name in NAMES:
        for i, case in enumerate(load(name)["cases"]):
            if case["mode"] == mode:
                out.append(pytest.param(name, i, id=f"{name}-{case['name']}"))
    return out


def build(fx: dict, case: dict, dtype: torch.dtype) -> torch.nn.Module:
    c = fx["meta"]["create"]
    model = create_model(c["name"], c["in_dim"], c["n_bins"], **{**c["hparams"], **case.get("hparams", {})})
    state = {**fx["state_dict"], **case.get("weights", {})}
    model.load_state_dict({k: v for k, v in state.items() if k not in case.get("drop_weights", ())}, strict=True)
    return model.to(dtype)


def make_bag(fx: dict, i: int, dtype: torch.dtype) -> Bag:
    b = fx["bags"][i]
    extras = {}
    for key, value in b["extras"].items():
        if key == "hierarchy":
            extras[key] = {**{k: v.clone() for k, v in value.items()}, "counts": {}}
        elif key == "graph":
            extras[key] = dict(value)
        elif key == "tissue_labels":
            extras[key] = value.clone()
    features = {s: f.to(dtype).clone().requires_grad_(True) for s, f in b["features"].items()}
    return Bag(case_id=b["case_id"], features=features, slide_index={s: v.clone() for s, v in b["slide_index"].items()},
               coords={s: v.clone() for s, v in b["coords"].items()}, extras=extras)


def patch_in_model_modules(monkeypatch, model: torch.nn.Module, attr: str, value) -> None:
    """Replace ``attr`` in every milbench module that defines one of the model's submodule classes."""
    for mod in {sys.modules[type(m).__module__] for m in model.modules()}:
        if mod.__name__.startswith("milbench") and hasattr(mod, attr):
            monkeypatch.setattr(mod, attr, value)


def inject_clusters(monkeypatch, model: torch.nn.Module, fx: dict, case_name: str, seen: list) -> None:
    """SCMIL: the k-means labels the fixture's stand-in k-means gave the authors' code; record milbench's input."""
    clustering = {c["case"]: c for c in fx["training"].get("clustering", [])}
    if case_name not in clustering:
        return
    labels = clustering[case_name]["labels"]

    def kmeans(z, k, *args, **kwargs):
        seen.append(z.detach().double().clone())
        assert k == int(labels.max()) + 1 and len(z) == len(labels)
        return torch.zeros(k, z.shape[1], device=z.device), labels.to(z.device)

    patch_in_model_modules(monkeypatch, model, "kmeans", kmeans)


def grads(out: torch.Tensor, cotangent: torch.Tensor, bag: Bag) -> dict[str, torch.Tensor]:
    for f in bag.features.values():
        f.grad = None
    (out.reshape(1, -1) * cotangent.to(out.dtype)).sum().backward(retain_graph=True)
    g = {s: (torch.zeros_like(f) if f.grad is None else f.grad.clone()) for s, f in bag.features.items()}
    for f in bag.features.values():
        f.grad = None
    return g


# ------------------------------------------------------------------------------------------- eval function


@pytest.mark.parametrize("name,index", cases("eval"))
def test_eval_logits_and_input_gradients_float64(name, index, monkeypatch):
    fx = load(name)
    case = fx["cases"][index]
    model = build(fx, case, torch.float64).eval()
    seen: list = []
    inject_clusters(monkeypatch, model, fx, case["name"], seen)
    bag = make_bag(fx, case["bag"], torch.float64)
    if "seed" in case:
        torch.manual_seed(case["seed"])
    out = model(bag)
    tol = TOL64_BY_FIXTURE.get(name, TOL64)
    torch.testing.assert_close(out.logits, case["logits64"], **tol)
    if "grads64" in case:
        got = grads(out.logits, fx["cotangent"], bag)
        for scale, expected in case["grads64"].items():
            torch.testing.assert_close(got[scale], expected, **tol, msg=lambda m: f"d logits / d {scale}: {m}")
    for task, expected in case.get("tasks64", {}).items():
        torch.testing.assert_close(out.tasks[task], expected, **tol)
        got = grads(out.tasks[task], fx["cotangent"], bag)
        for scale, g in case["task_grads64"][task].items():
            torch.testing.assert_close(got[scale], g, **tol, msg=lambda m: f"d {task} / d {scale}: {m}")


EVAL32 = [c for c in cases("eval") if "logits32" in load(c.values[0])["cases"][c.values[1]]]


@pytest.mark.parametrize("name,index", EVAL32)
def test_eval_logits_float32(name, index, monkeypatch):
    fx = load(name)
    case = fx["cases"][index]
    model = build(fx, case, torch.float32).eval()
    inject_clusters(monkeypatch, model, fx, case["name"], [])
    with torch.no_grad():
        out = model(make_bag(fx, case["bag"], torch.float32))
    torch.testing.assert_close(out.logits, case["logits32"], **TOL32)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_at_the_training_configuration(name):
    """milbench's count at input width 1024 = the authors' minus the weights they build and never use (SCMIL's
    fc1 and SelfAttention, ProtoSurv's ProtoGNN.norm/lin/proto_mlp; ProtoSurv's hazard head has 3,076 parameters
    where the Cox layer has 768)."""
    fx = load(name)
    c, ref = fx["meta"]["create"], fx["meta"]["reference"]
    ours = sum(p.numel() for p in create_model(c["name"], 1024, c["n_bins"], **c["full_hparams"]).parameters())
    expected = ref["params_1024"] - ref.get("dead_params_1024", 0)
    if c["name"] == "protosurv":
        expected += (768 * 4 + 4) - 768
    assert ours == expected


# ------------------------------------------------------------------------------------------- data the models read


@pytest.mark.parametrize("name", [n for n in NAMES if any("hierarchy" in b["extras"] for b in load(n)["bags"])])
def test_cross_scale_index_matches_the_fixture(name):
    from milbench.data.multiscale import build_index

    for b in load(name)["bags"]:
        index = build_index(b["coords"], b["slide_index"])
        for key, expected in b["extras"]["hierarchy"].items():
            assert torch.equal(index[key], expected), key


@pytest.mark.parametrize("name", [n for n in NAMES if any("graph" in b["extras"] for b in load(n)["bags"])])
def test_patch_graph_matches_the_fixture(name):
    from milbench.data.graphs import patch_graph

    for b in load(name)["bags"]:
        g = b["extras"]["graph"]
        built = patch_graph(b["features"]["20x"], b["coords"]["20x"], b["slide_index"]["20x"], kind=g["kind"],
                            k=g["k"])["edge_index"]
        assert {tuple(e) for e in built.T.tolist()} == {tuple(e) for e in g["edge_index"].T.tolist()}


# ------------------------------------------------------------------------------------------- training paths


def replay_noise(monkeypatch, noise: list[torch.Tensor]) -> list:
    """torch.randn returns the recorded Gaussian draws of each perturbed top-k call, in order."""
    queue = list(noise)
    calls: list = []
    randn = torch.randn

    def fake(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        if queue and tuple(queue[0].shape) == tuple(shape):
            calls.append(shape)
            z = queue.pop(0)
            return z.to(dtype=kwargs.get("dtype") or torch.get_default_dtype(), device=kwargs.get("device"))
        return randn(*size, **kwargs)

    monkeypatch.setattr(torch, "randn", fake)
    return calls


@pytest.mark.parametrize("name,index", cases("train"))
def test_training_forward_and_gradients(name, index, monkeypatch):
    """ZoomMIL in training mode (dropout off) with the authors' perturbation noise: same selection, and the
    gradients of the selection attentions, which learn only through the top-k backward."""
    fx = load(name)
    case = fx["cases"][index]
    model = build(fx, case, torch.float64).train()
    bag = make_bag(fx, case["bag"], torch.float64)
    calls = replay_noise(monkeypatch, case["noise"])
    out = model(bag)
    assert len(calls) == len(case["noise"]), "milbench drew its perturbations in another order or shape"
    torch.testing.assert_close(out.logits, case["logits64"], **TOL_TRAIN)
    model.zero_grad()
    got = grads(out.logits, fx["cotangent"], bag)
    for scale, expected in case["grads64"].items():
        torch.testing.assert_close(got[scale], expected, **TOL_TRAIN, msg=lambda m: f"d logits / d {scale}: {m}")
    params = dict(model.named_parameters())
    for pname, expected in case["param_grads64"].items():
        torch.testing.assert_close(params[pname].grad, expected, **TOL_TRAIN, msg=lambda m: f"{pname}: {m}")


def _perturbed_topk():
    try:
        from milbench.models.layers.topk import perturbed_topk  # after the restructure (name may differ)
    except ImportError:
        from milbench.models.blocks import perturbed_topk
    return perturbed_topk


@pytest.mark.parametrize("which", [0, 1], ids=["sigma0.002", "sigma0.05"])
@pytest.mark.parametrize("grad", ["authors", "full"])
def test_perturbed_topk_operator(which, grad, monkeypatch):
    """The operator alone: the same forward indicator; the default backward is the authors' (diagonal) estimator,
    ``grad="full"`` the perturbed-maximum estimator of Berthet et al. from the same draws."""
    op = load("zoommil")["training"]["perturbed_topk"][which]
    perturbed_topk = _perturbed_topk()
    kwargs = {}
    if grad == "full":
        if "grad" not in inspect.signature(perturbed_topk).parameters:
            pytest.fail("perturbed_topk has no grad= option (the full estimator is not selectable)")
        kwargs["grad"] = "full"
    scores = op["scores"].clone().requires_grad_(True)
    replay_noise(monkeypatch, [op["noise"]])
    ind = perturbed_topk(scores, op["k"], op["n_samples"], op["sigma"], differentiable=True, **kwargs)
    torch.testing.assert_close(ind.double(), op["indicator"], rtol=0, atol=1e-12)
    (ind.double() * op["upstream"]).sum().backward()
    expected = op["grad_authors"] if grad == "authors" else op["grad_full"]
    torch.testing.assert_close(scores.grad, expected, rtol=1e-5, atol=1e-6)


def test_csmil_bag_sampling_matches_the_authors_loader(monkeypatch):
    """CS-MIL's training bags: one length L = max(1, int(N(3, 1))) per bag, min(L, cluster size) instances from
    every cluster, uniformly with replacement; compared with 1,000 bags of the authors' loader on the same clusters."""
    fx = load("csmil")
    s = fx["training"]["sampling"]
    labels = s["labels"]
    sizes = torch.bincount(labels, minlength=8)
    model = build(fx, {"hparams": {}}, torch.float32).train()
    patch_in_model_modules(monkeypatch, model, "kmeans",
                           lambda x, k, *a, **kw: (torch.zeros(k, x.shape[1]), labels[: len(x)].to(x.device)))
    bag = make_bag(fx, 1, torch.float32)
    feats = bag.features["20x"].detach()
    drawn: list[torch.Tensor] = []
    model.embed.register_forward_hook(lambda m, i, o: drawn.append(i[0].detach()) if len(drawn) % 3 == 0 else
                                      drawn.append(None))
    torch.manual_seed(0)
    lengths, dup_ours = [], 0
    with torch.no_grad():
        for _ in range(len(s["lengths"])):
            drawn.clear()
            model(bag)
            rows = (drawn[0][:, None, :] == feats[None]).all(-1).float().argmax(1)  # which 20x patch each draw is
            counts = torch.bincount(labels[rows], minlength=8)
            length = int(counts.max())
            assert torch.equal(counts, sizes.clamp(max=length)), (counts, sizes)  # min(L, size) from every cluster
            lengths.append(length)
            dup_ours += int(any(len(rows[labels[rows] == c].unique()) < int(counts[c]) for c in range(8)))
    ours = torch.bincount(torch.tensor(lengths), minlength=8)[:8].double() / len(lengths)
    theirs = torch.bincount(s["lengths"].long(), minlength=8)[:8].double() / len(s["lengths"])
    assert 0.5 * (ours - theirs).abs().sum() < 0.08, (ours, theirs)  # total variation of the bag lengths
    # with replacement: some bags repeat an instance within a cluster, about as often as the authors' do
    dup_theirs = 0
    for t in range(len(s["lengths"])):
        ids = s["ids"][s["draw_of"] == t].long()
        dup_theirs += int(any(len(ids[labels[ids] == c].unique()) < int((labels[ids] == c).sum()) for c in range(8)))
    assert abs(dup_ours - dup_theirs) / len(lengths) < 0.08


@pytest.mark.parametrize("name,index", [c for c in cases("eval") if c.values[0] == "scmil"])
def test_scmil_clustering_input_is_the_authors(name, index, monkeypatch):
    """The k-means input [0.8 z(x~), 0.2 z(coords)], z a scalar z-score with torch.std (unbiased), as the authors'."""
    fx = load(name)
    case = fx["cases"][index]
    model = build(fx, case, torch.float64).eval()
    seen: list = []
    inject_clusters(monkeypatch, model, fx, case["name"], seen)
    with torch.no_grad():
        model(make_bag(fx, case["bag"], torch.float64))
    expected = next(c["input"] for c in fx["training"]["clustering"] if c["case"] == case["name"])
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected, rtol=1e-6, atol=1e-6)  # milbench clusters in float32
