"""Golden outputs of the authors' code, for milbench's equality tests (issue 18).

For every registry model this builds the authors' model from a checkout of their repository, with a fixed seed, at
their training configuration (dropout, heads, k, sigma, cluster sizes, ...), maps its weights to milbench's
parameter names, runs it on a few small bags and writes ``tests/fixtures/golden/<fixture>.pt``: the weights (milbench
names, float32), the bags (features, coordinates and whatever the model needs: patch graph, cross-scale index,
tissue labels, clusters), and the authors' outputs: eval logits in float64 and float32, the gradient of
<logits, cotangent> with respect to every input feature tensor (float64), and for ZoomMIL, CS-MIL and SCMIL the
training-path quantities (the perturbed top-k gradient with its recorded noise, the sampled bag sizes of the
authors' data loader, the k-means input). The fixtures hold numbers only, never the authors' code.

Widths: the input width is 32 and hidden widths are small so that the fixtures stay small; where the authors'
constructor hard-codes a width, the layer is rebuilt with the authors' own class at the small width (recorded in
each fixture's ``reference.build``). Equality at one width is equality of the function (milbench's widths are
hyper-parameters); the parameter count at the full training configuration (input width 1024) is recorded from the
authors' code in ``reference.params_1024``.

Usage (checkouts fetched outside the project, never copied into it)::

    python scripts/golden_outputs.py --out tests/fixtures/golden \\
        --crossfusion /tmp/ref/CrossFusion --patchgcn /tmp/ref/Patch-GCN --dsmil /tmp/ref/dsmil-wsi \\
        --transmil /tmp/ref/TransMIL --nystrom09 /tmp/ref/nystrom-attention-0.0.9 --scmil /tmp/ref/SCMIL \\
        --protosurv /tmp/ref/ProtoSurv --zoommil /tmp/ref/zoommil --mustmil /tmp/ref/MuSTMIL --csmil /tmp/ref/CS-MIL \\
        --refdeps /tmp/refdeps [--only zoommil,csmil]

``--refdeps`` is a folder of extra packages the authors' code imports (einops: ``pip install --target /tmp/refdeps
-c constraints.txt einops``). A checkout that is an exported tree rather than a git work tree names its commit in a
``.golden_commit`` file. Runs on one CPU thread in about a minute.
"""

from __future__ import annotations

import argparse
import copy
import io
import lzma
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from golden_reference import (
    as_float32,
    capture_output,
    contiguous_einsum,
    flat_bag,
    git_commit,
    grads_of,
    import_repo,
    knn_edges,
    leaves,
    load_class_from_script,
    n_params,
    nested_bag,
    reference_runtime,
    rename_state_dict,
    stub_modules,
    take_rows,
)

IN_DIM = 32
N_BINS = 4
SEED = 0
FORMAT = 1


def milbench_create_model() -> Callable[..., nn.Module]:
    """milbench's ``create_model``: ``milbench.models.registry`` after the package restructure, else
    ``milbench.registry``."""
    try:
        from milbench.models.registry import create_model
    except ImportError:
        from milbench.registry import create_model
    return create_model


class Fixture:
    """What one fixture file holds (see the module docstring); ``cases`` are comparisons, each naming its bag, the
    milbench hyper-parameters on top of ``create.hparams``, and the authors' outputs."""

    def __init__(self, name: str, model: str, hparams: dict, repo: str, root: Path, files: list[str], build: str,
                 full: dict | None = None):
        """``hparams``: milbench's options for the fixture's widths; ``full``: its options at the training
        configuration, whose parameter count at input width 1024 is compared with ``reference.params_1024``."""
        self.name = name
        self.meta: dict[str, Any] = {
            "format": FORMAT,
            "fixture": name,
            "create": {"name": model, "in_dim": IN_DIM, "n_bins": N_BINS, "hparams": hparams,
                       "full_hparams": full or {}},
            "reference": {"repo": repo, "commit": git_commit(root), "files": files, "build": build},
            "torch": str(torch.__version__),
            "seed": SEED,
            "notes": [],
        }
        self.state_dict: dict[str, torch.Tensor] = {}
        self.bags: list[dict] = []
        self.cases: list[dict] = []
        self.training: dict[str, Any] = {}
        gen = torch.Generator().manual_seed(SEED + 1)
        self.cotangent = torch.randn(1, N_BINS, generator=gen, dtype=torch.float64)

    def note(self, text: str) -> None:
        self.meta["notes"].append(text)

    def eval_case(self, name: str, bag: int, run: Callable[[dict[str, torch.Tensor], bool], dict], *,
                  hparams: dict | None = None, seed: int | None = None, grads: bool = True,
                  weights: dict[str, torch.Tensor] | None = None, drop_weights: list[str] | None = None,
                  float32: bool = True) -> dict:
        """Run the authors' model on bag ``bag`` in float64 (with input gradients) and float32.

        ``run(inputs, float64)`` gets the bag's features as leaf tensors and returns ``{"logits": [1, n_bins],
        "tasks": {name: [1, n_bins]}}``; ``seed`` seeds torch's RNG right before each run (stochastic reference
        paths); ``weights`` replaces some of the fixture weights for this case and ``drop_weights`` removes some
        (milbench names)."""
        case: dict[str, Any] = {"name": name, "bag": bag, "mode": "eval", "hparams": hparams or {}}
        if seed is not None:
            case["seed"] = seed
        if weights:
            case["weights"] = as_float32(weights)
        if drop_weights:
            case["drop_weights"] = list(drop_weights)
        for float64 in (True, False) if float32 else (True,):
            dtype = torch.float64 if float64 else torch.float32
            inputs = leaves(self.bags[bag], dtype)
            if seed is not None:
                torch.manual_seed(seed)
            with reference_runtime(float64):
                out = run(inputs, float64)
            tag = "64" if float64 else "32"
            case[f"logits{tag}"] = out["logits"].detach().to(dtype).reshape(1, -1).clone()
            if out.get("tasks"):
                case[f"tasks{tag}"] = {k: v.detach().to(dtype).reshape(1, -1).clone() for k, v in out["tasks"].items()}
            if float64 and grads:
                case["grads64"] = grads_of(out["logits"], self.cotangent, inputs, retain_graph=True)
                for k, v in (out.get("tasks") or {}).items():
                    case.setdefault("task_grads64", {})[k] = grads_of(v, self.cotangent, inputs, retain_graph=True)
        self.cases.append(case)
        return case

    def check_milbench(self) -> int:
        """Build milbench's model with these weights (strict): the name mapping is complete and the shapes agree.
        Returns its parameter count at input width 1024 for the log."""
        create = milbench_create_model()
        c = self.meta["create"]
        for case in self.cases or [{"hparams": {}}]:
            model = create(c["name"], c["in_dim"], c["n_bins"], **{**c["hparams"], **case.get("hparams", {})})
            state = {**self.state_dict, **case.get("weights", {})}
            model.load_state_dict({k: v for k, v in state.items() if k not in case.get("drop_weights", ())},
                                  strict=True)
        return sum(p.numel() for p in create(c["name"], 1024, c["n_bins"], **c["full_hparams"]).parameters())

    def save(self, out_dir: Path) -> Path:
        """``<name>.pt.xz``: torch.save of tensors, lists, dicts and plain values (loads with weights_only=True),
        xz-compressed (the many zero gradients of zoomed-out patches compress away)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.name}.pt.xz"
        buf = io.BytesIO()
        torch.save({"meta": self.meta, "state_dict": as_float32(self.state_dict), "bags": self.bags,
                    "cotangent": self.cotangent, "cases": self.cases, "training": self.training}, buf)
        path.write_bytes(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))
        return path


def build(seed: int, fn: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(seed)
    return fn()


def double(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double()


def pick(float64: bool, m32: nn.Module, m64: nn.Module) -> nn.Module:
    return m64 if float64 else m32


GATED = [(r"(.*)attention_a\.0\.(weight|bias)", r"\1score.attn_a.0.\2"),
         (r"(.*)attention_b\.0\.(weight|bias)", r"\1score.attn_b.0.\2"),
         (r"(.*)attention_c\.(weight|bias)", r"\1score.attn_c.\2")]


def gated(src: str, dst: str) -> list[tuple[str, str]]:
    """Rules for a gated-attention scorer (attention_a / _b / _c) at ``src`` -> milbench's AttentionPool ``dst``."""
    return [(rf"{src}\.attention_a\.0\.(weight|bias)", rf"{dst}.attn_a.0.\1"),
            (rf"{src}\.attention_b\.0\.(weight|bias)", rf"{dst}.attn_b.0.\1"),
            (rf"{src}\.attention_c\.(weight|bias)", rf"{dst}.attn_c.\1")]


# ============================================================================================ single-scale models


def fx_amil(a) -> list[Fixture]:
    """AMIL, both variants: CrossFusion's models/AMIL.py (default) and Patch-GCN's MIL_Attention_FC_surv."""
    cf = import_repo(a.crossfusion, "models.AMIL")
    rng = np.random.default_rng(SEED)
    bags = [flat_bag(rng, 37, IN_DIM, "amil-0"), flat_bag(rng, 50, IN_DIM, "amil-1")]
    out = []

    # --- CrossFusion repository variant: Linear(D, 512) + ReLU, gated attention 256, Linear(512, 4), no dropout
    def make_cf():
        m = cf.AMIL(backbone_dim=IN_DIM, n_classes=N_BINS, gate=True)
        m.attention_net[0] = nn.Linear(IN_DIM, 64)  # widths 512 / 256 are hard-coded: the authors' layers at 64 / 32
        m.attention_net[2] = cf.Attn_Net_Gated(L=64, D=32, n_classes=1)
        m.classifiers = nn.Linear(64, N_BINS)
        return m

    ref = build(SEED, make_cf).eval()
    fx = Fixture("amil", "amil", {"hidden": 64, "attn_dim": 32}, "RustinS/CrossFusion", a.crossfusion,
                 ["models/AMIL.py"],
                 "AMIL(backbone_dim=32, n_classes=4, gate=True); attention_net[0] = Linear(32, 64), "
                 "attention_net[2] = Attn_Net_Gated(L=64, D=32), classifiers = Linear(64, 4)")
    fx.meta["reference"]["params_1024"] = n_params(cf.AMIL(1024, N_BINS, gate=True))
    fx.state_dict = rename_state_dict(ref.state_dict(), [
        (r"attention_net\.0\.(weight|bias)", r"embed.0.\1"), *gated("attention_net.2", "pool.score"),
        (r"classifiers\.(weight|bias)", r"head.\1")])
    fx.bags = bags
    ref64 = double(ref)
    for i in range(len(bags)):
        fx.eval_case(f"eval-{i}", i, lambda x, f64: {"logits": pick(f64, ref, ref64)(None, None, x["20x"][None])[3]})
    out.append(fx)

    # --- Patch-GCN's MIL_Attention_FC_surv: dropout 0.25 everywhere, rho Linear(512, 256), Linear(256, 4)
    pg = import_repo(a.patchgcn, "models.model_set_mil")  # its Attn_Net_Gated comes from models/model_utils.py

    def make_pg():
        m = pg.MIL_Attention_FC_surv(size_arg="small", dropout=0.25, n_classes=N_BINS)
        m.attention_net[0] = nn.Linear(IN_DIM, 64)  # size_dict [1024, 512, 256] is hard-coded
        m.attention_net[3] = pg.Attn_Net_Gated(L=64, D=32, dropout=0.25, n_classes=1)
        m.rho[0] = nn.Linear(64, 32)
        m.classifier = nn.Linear(32, N_BINS)
        return m

    ref = build(SEED, make_pg).eval()
    fx = Fixture("amil_patchgcn", "amil", {"variant": "patchgcn", "hidden": 64, "attn_dim": 32}, "mahmoodlab/Patch-GCN",
                 a.patchgcn, ["models/model_set_mil.py", "models/model_utils.py"],
                 "MIL_Attention_FC_surv(size_arg='small', dropout=0.25, n_classes=4); "
                 "attention_net[0] = Linear(32, 64), "
                 "attention_net[3] = Attn_Net_Gated(L=64, D=32, dropout=0.25), rho[0] = Linear(64, 32), "
                 "classifier = Linear(32, 4)", full={"variant": "patchgcn"})
    fx.meta["reference"]["params_1024"] = n_params(pg.MIL_Attention_FC_surv(size_arg="small", n_classes=N_BINS))
    fx.state_dict = rename_state_dict(ref.state_dict(), [
        (r"attention_net\.0\.(weight|bias)", r"embed.0.\1"), *gated("attention_net.3", "pool.score"),
        (r"rho\.0\.(weight|bias)", r"rho.0.\1"), (r"classifier\.(weight|bias)", r"head.\1")])
    fx.bags = bags
    ref64 = double(ref)

    def run_pg(x, f64):
        m = pick(f64, ref, ref64)
        seen, h = capture_output(m.classifier)  # the forward returns hazards; the logits are the classifier's output
        m(x_path=x["20x"])
        h.remove()
        return {"logits": seen[0].reshape(1, -1)}

    for i in range(len(bags)):
        fx.eval_case(f"eval-{i}", i, run_pg)
    out.append(fx)
    return out


def fx_dsmil(a) -> list[Fixture]:
    """DSMIL: CrossFusion's models/DSMIL.py (bag logits); dsmil-wsi's dsmil.py for the max-instance logits that
    milbench's default instance loss trains (``tasks["max_instance"]``)."""
    cf = import_repo(a.crossfusion, "models.DSMIL")
    ref = build(SEED, lambda: cf.DSMIL(backbone_dim=IN_DIM, n_classes=N_BINS)).eval()
    fx = Fixture("dsmil", "dsmil", {}, "RustinS/CrossFusion + binli123/dsmil-wsi", a.crossfusion,
                 ["models/DSMIL.py (CrossFusion)", f"dsmil.py (dsmil-wsi {git_commit(a.dsmil)})"],
                 "DSMIL(backbone_dim=32, n_classes=4) (CrossFusion); dsmil-wsi MILNet(FCLayer(32, 4), "
                 "BClassifier(32, 4, dropout_v=0.0, nonlinear=True)) with the same weights")
    fx.meta["reference"]["params_1024"] = n_params(cf.DSMIL(1024, N_BINS))
    fx.state_dict = rename_state_dict(ref.state_dict(), [
        (r"i_classifier\.fc\.0\.(weight|bias)", r"instance_classifier.\1"),
        (r"b_classifier\.q\.(0|2)\.(weight|bias)", r"query.\1.\2"),
        (r"b_classifier\.fcc\.(weight|bias)", r"bag_classifier.\1")])
    orig = import_repo(a.dsmil, "dsmil", packages=())
    milnet = orig.MILNet(orig.FCLayer(IN_DIM, N_BINS), orig.BClassifier(IN_DIM, N_BINS, dropout_v=0.0, nonlinear=True))
    milnet.load_state_dict(ref.state_dict())
    milnet.eval()
    rng = np.random.default_rng(SEED + 2)
    fx.bags = [flat_bag(rng, 37, IN_DIM, "dsmil-0"), flat_bag(rng, 50, IN_DIM, "dsmil-1")]
    ref64, milnet64 = double(ref), double(milnet)

    def run(x, f64):
        logits = pick(f64, ref, ref64)(None, None, x["20x"][None])[3]
        classes, bag_logits, _, _ = pick(f64, milnet, milnet64)(x["20x"])
        assert torch.allclose(bag_logits, logits, atol=1e-6), "dsmil-wsi and CrossFusion's DSMIL disagree"
        return {"logits": logits, "tasks": {"max_instance": classes.max(0).values.reshape(1, -1)}}

    for i in range(len(fx.bags)):
        fx.eval_case(f"eval-{i}", i, run)
    # the reference variant (CrossFusion's: no instance loss) has no task; its logits are the same
    fx.eval_case("eval-0-instance_loss_off", 0,
                 lambda x, f64: {"logits": pick(f64, ref, ref64)(None, None, x["20x"][None])[3]},
                 hparams={"instance_loss": False}, float32=False)
    fx.note("dsmil-wsi's train_tcga.py trains on 0.5 * bag loss + 0.5 * loss(max over instances of the instance "
            "logits): tasks['max_instance'] is that max; CrossFusion's DSMIL drops it (instance_loss=False).")
    fx.note("Both references scale the attention by sqrt(128) computed in float32 (torch.tensor(..., float32)): "
            "float64 runs differ from an exact float64 computation by about 1e-8 relative.")
    return [fx]


def fx_transmil(a) -> list[Fixture]:
    """TransMIL: CrossFusion's models/TransMIL.py (default, nystrom slicing 'last') and the TransMIL repository with
    nystrom-attention 0.0.9 (``nystrom_slicing='first'``)."""
    cf = import_repo(a.crossfusion, "models.TransMIL", extra_paths=[a.refdeps] if a.refdeps else ())
    dim = 64

    def shrink(m, mod):  # the width 512 is hard-coded: the authors' blocks at 64 (8 heads of 8, 32 landmarks)
        m.pos_layer = mod.PPEG(dim=dim)
        m._fc1 = nn.Sequential(nn.Linear(IN_DIM, dim), nn.ReLU())
        m.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        m.layer1, m.layer2 = mod.TransLayer(dim=dim), mod.TransLayer(dim=dim)
        m.norm = nn.LayerNorm(dim)
        m._fc2 = nn.Linear(dim, N_BINS)
        return m

    ref = build(SEED, lambda: shrink(cf.TransMIL(backbone_dim=IN_DIM, n_classes=N_BINS), cf)).eval()
    fx = Fixture("transmil", "transmil", {"dim": dim}, "RustinS/CrossFusion + szc19990412/TransMIL", a.crossfusion,
                 ["models/TransMIL.py (CrossFusion)", f"models/TransMIL.py (TransMIL {git_commit(a.transmil)})",
                  f"nystrom_attention/nystrom_attention.py (lucidrains/nystrom-attention 0.0.9, "
                  f"{git_commit(a.nystrom09)})"],
                 "TransMIL(backbone_dim=32, n_classes=4) with pos_layer, _fc1, cls_token, layer1, layer2, norm, _fc2 "
                 "rebuilt at width 64 from the same module's classes (TransLayer(dim=64): 8 heads of 8, 32 landmarks, "
                 "dropout 0.1)")
    with reference_runtime(False):
        fx.meta["reference"]["params_1024"] = n_params(cf.TransMIL(1024, N_BINS))
    rules = [(r"_fc1\.0\.(weight|bias)", r"embed.0.\1"), (r"cls_token", "cls_token"),
             (r"(layer[12])\.norm\.(weight|bias)", r"\1.norm.\2"),
             (r"(layer[12])\.attn\.to_qkv\.weight", r"\1.attn.qkv.weight"),
             (r"(layer[12])\.attn\.to_out\.0\.(weight|bias)", r"\1.attn.out.0.\2"),
             (r"(layer[12])\.attn\.res_conv\.weight", r"\1.attn.residual_conv.weight"),
             (r"pos_layer\.proj\.(weight|bias)", r"ppeg.proj7.\1"),
             (r"pos_layer\.proj1\.(weight|bias)", r"ppeg.proj5.\1"),
             (r"pos_layer\.proj2\.(weight|bias)", r"ppeg.proj3.\1"), (r"norm\.(weight|bias)", r"norm.\1"),
             (r"_fc2\.(weight|bias)", r"head.\1")]
    fx.state_dict = rename_state_dict(ref.state_dict(), rules)
    rng = np.random.default_rng(SEED + 3)
    fx.bags = [flat_bag(rng, 37, IN_DIM, "transmil-0"), flat_bag(rng, 60, IN_DIM, "transmil-1")]
    ref64 = double(ref)
    for i in range(len(fx.bags)):
        fx.eval_case(f"eval-{i}", i, lambda x, f64: {"logits": pick(f64, ref, ref64)(None, None, x["20x"][None])[3]})

    # TransMIL repository + nystrom-attention 0.0.9 (keeps the first n rows of the left-padded output)
    orig = import_repo(a.transmil, "models.TransMIL", extra_paths=[a.nystrom09, *([a.refdeps] if a.refdeps else [])])
    sys.modules.pop("nystrom_attention", None)
    sys.modules.pop("nystrom_attention.nystrom_attention", None)
    o = shrink(orig.TransMIL(n_classes=N_BINS), orig)
    o.load_state_dict(ref.state_dict())
    o.eval()
    o64 = double(o)

    def run_orig(x, f64):
        with torch.no_grad():  # 0.0.9's in-place q *= scale fails under autograd (below)
            return {"logits": pick(f64, o, o64)(data=x["20x"][None])["logits"]}

    for i in range(len(fx.bags)):
        fx.eval_case(f"eval-{i}-slicing_first", i, run_orig, hparams={"nystrom_slicing": "first"}, grads=False)
    try:
        x = fx.bags[0]["features"]["20x"][None].clone().requires_grad_(True)
        with reference_runtime(False):
            o.train()(data=x)["logits"].sum().backward()
        crash = "none"
    except RuntimeError as err:
        crash = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    o.eval()
    fx.training["nystrom_0.0.9_backward"] = crash
    fx.note("nystrom_slicing='first' is compared in eval only: nystrom-attention 0.0.9 cannot run a backward pass "
            f"on current PyTorch ({crash}).")
    return [fx]


def fx_graphs(a) -> list[Fixture]:
    """DeepGraphSurv as Patch-GCN's DeepGraphConv_Surv (feature kNN graph) and PatchGCN_Surv (spatial kNN graph)."""
    from torch_geometric.data import Data

    pg = import_repo(a.patchgcn, "models.model_graph_mil")
    rng = np.random.default_rng(SEED + 4)
    out = []

    # --- DGC
    ref = build(SEED, lambda: pg.DeepGraphConv_Surv(edge_agg="latent", resample=0, num_features=IN_DIM, hidden_dim=32,
                                                     dropout=0.25, n_classes=N_BINS)).eval()
    bags = [flat_bag(rng, 40, IN_DIM, "dgc-0"), flat_bag(rng, 55, IN_DIM, "dgc-1")]
    for b in bags:
        b["extras"]["graph"] = {"edge_index": knn_edges(b["features"]["20x"].double().numpy(), 8), "kind": "latent",
                                "k": 8}
    try:
        with reference_runtime(False):
            ref(x_path=Data(x=bags[0]["features"]["20x"], edge_latent=bags[0]["extras"]["graph"]["edge_index"],
                            batch=torch.zeros(40, dtype=torch.long)))
        crash = "none"
    except AttributeError as err:
        crash = f"AttributeError: {err}"
    ref.pool = False  # the attribute the forward reads and the constructor never sets: the only path that runs
    fx = Fixture("deepgraphsurv", "deepgraphsurv", {"hidden": 32}, "mahmoodlab/Patch-GCN", a.patchgcn,
                 ["models/model_graph_mil.py", "models/model_utils.py"],
                 "DeepGraphConv_Surv(edge_agg='latent', resample=0, num_features=32, hidden_dim=32, dropout=0.25, "
                 "n_classes=4); pool = False set after construction")
    fx.meta["reference"]["params_1024"] = n_params(pg.DeepGraphConv_Surv(num_features=1024, n_classes=N_BINS))
    fx.training["forward_without_pool"] = crash
    fx.note(f"The reference forward reads self.pool, never set: {crash}. milbench runs pool=False, the only path "
            "that runs; there is nothing to reproduce.")
    fx.state_dict = rename_state_dict(ref.state_dict(), [
        (r"(conv[123])\.(eps|nn\.[02]\.weight|nn\.[02]\.bias)", r"\1.\2"),
        *gated("path_attention_head", "attention_pool.score"),
        (r"path_rho\.0\.(weight|bias)", r"rho.0.\1"), (r"classifier\.(weight|bias)", r"head.\1")])
    fx.bags = bags
    ref64 = double(ref)

    def run_dgc(x, f64):
        m = pick(f64, ref, ref64)
        seen, h = capture_output(m.classifier)
        e = fx.bags[run_dgc.bag]["extras"]["graph"]["edge_index"]
        m(x_path=Data(x=x["20x"], edge_latent=e, batch=torch.zeros(len(x["20x"]), dtype=torch.long)))
        h.remove()
        return {"logits": seen[0].reshape(1, -1)}

    for i in range(len(bags)):
        run_dgc.bag = i
        fx.eval_case(f"eval-{i}", i, run_dgc)
    out.append(fx)

    # --- PatchGCN
    def make_pg():
        m = pg.PatchGCN_Surv(num_layers=4, edge_agg="spatial", resample=0, hidden_dim=16, dropout=0.25,
                             n_classes=N_BINS)
        m.fc = nn.Sequential(nn.Linear(IN_DIM, 16), nn.ReLU(), nn.Dropout(0.25))  # Linear(1024, 128) is hard-coded
        return m

    ref = build(SEED, make_pg).eval()
    bags = [flat_bag(rng, 40, IN_DIM, "patchgcn-0"), flat_bag(rng, 55, IN_DIM, "patchgcn-1")]
    for b in bags:
        b["extras"]["graph"] = {"edge_index": knn_edges(b["coords"]["20x"].numpy(), 8), "kind": "spatial", "k": 8}
    fx = Fixture("patchgcn", "patchgcn", {"hidden": 16}, "mahmoodlab/Patch-GCN", a.patchgcn,
                 ["models/model_graph_mil.py"],
                 "PatchGCN_Surv(num_layers=4, edge_agg='spatial', resample=0, hidden_dim=16, dropout=0.25, "
                 "n_classes=4); fc = Sequential(Linear(32, 16), ReLU(), Dropout(0.25))")
    fx.meta["reference"]["params_1024"] = n_params(pg.PatchGCN_Surv(n_classes=N_BINS))
    try:  # resample > 0: fc outputs 256 features, the GENConvs expect 128
        crashing = pg.PatchGCN_Surv(resample=0.5, n_classes=N_BINS).eval()
        with reference_runtime(False):
            crashing(x_path=Data(x=torch.randn(40, 1024), edge_index=bags[0]["extras"]["graph"]["edge_index"],
                                 batch=torch.zeros(40, dtype=torch.long)))
        crash = "none"
    except RuntimeError as err:
        crash = f"RuntimeError: {str(err).splitlines()[0]}"
    fx.training["resample_forward"] = crash
    fx.note(f"resample > 0 crashes in the reference ({crash}); milbench's resample is a Dropout on the input "
            "features in front of the usual fc, so in eval it is the resample=0 function (case eval-0-resample).")
    fx.state_dict = rename_state_dict(ref.state_dict(), [
        (r"fc\.0\.(weight|bias)", r"fc.1.\1"), (r"layers\.(\d)\.(.*)", r"gcn.layers.\1.\2"),
        (r"path_phi\.0\.(weight|bias)", r"phi.0.\1"), *gated("path_attention_head", "attention_pool.score"),
        (r"path_rho\.0\.(weight|bias)", r"rho.0.\1"), (r"classifier\.(weight|bias)", r"head.\1")])
    fx.bags = bags
    ref64 = double(ref)

    def run_pg(x, f64):
        m = pick(f64, ref, ref64)
        seen, h = capture_output(m.classifier)
        e = fx.bags[run_pg.bag]["extras"]["graph"]["edge_index"]
        m(x_path=Data(x=x["20x"], edge_index=e, batch=torch.zeros(len(x["20x"]), dtype=torch.long)))
        h.remove()
        return {"logits": seen[0].reshape(1, -1)}

    for i in range(len(bags)):
        run_pg.bag = i
        fx.eval_case(f"eval-{i}", i, run_pg)
    run_pg.bag = 0
    fx.eval_case("eval-0-resample", 0, run_pg, hparams={"resample": 0.5}, float32=False)
    out.append(fx)
    return out


def fx_scmil(a) -> list[Fixture]:
    """SCMIL (yang-ze-kang/SCMIL models/SCMIL.py) with the discrete head (its n_classes classifier). cuML's k-means
    is replaced by a recorder: it keeps the clustering input the authors' code builds and answers scikit-learn's
    k-means with the authors' settings (k-means++, 5 iterations, tol 1e-4, random_state 1); milbench's test injects
    the same labels, so the comparison is of everything but the k-means implementation."""
    from sklearn.cluster import KMeans as SkKMeans

    calls: list[dict] = []

    class RecordingKMeans:
        def __init__(self, n_clusters, init="k-means++", tol=1e-4, max_iter=5, random_state=1):
            self.kw = dict(n_clusters=n_clusters, init=init, tol=tol, max_iter=max_iter, random_state=random_state)

        def fit_predict(self, z):
            z = torch.as_tensor(z).detach()
            labels = SkKMeans(n_init=1, **self.kw).fit_predict(z.double().numpy())
            calls.append({"input": z.clone(), "labels": torch.from_numpy(labels.astype(np.int64))})
            return types_ns(labels)

    def types_ns(labels):
        class Device:  # cuML returns a device array; the code calls .get()
            def get(self):
                return labels
        return Device()

    stub_modules(["cuml"], **{"cuml.KMeans": RecordingKMeans})
    mod = import_repo(a.scmil, "models.SCMIL", extra_paths=[a.refdeps] if a.refdeps else ())
    cfg = dict(n_classes=N_BINS, input_size=IN_DIM, deep=1, cluster_size=64, feature_weight=0.8, dropout_rate=0.25,
               with_softfilter=True)
    ref = build(SEED, lambda: mod.SCMIL(**cfg)).eval()
    fx = Fixture("scmil", "scmil", {}, "yang-ze-kang/SCMIL", a.scmil,
                 ["models/SCMIL.py", "models/SoftFilter.py", "models/AMIL.py", "configs/luad_scmil.yaml"],
                 "SCMIL(n_classes=4, input_size=32, deep=1, cluster_size=64, feature_weight=0.8, dropout_rate=0.25, "
                 "with_softfilter=True) (the luad/kirc_scmil.yaml backbone at input 32); cuml.KMeans -> recorder")
    full = mod.SCMIL(**{**cfg, "input_size": 1024})
    dead = sum(p.numel() for n, p in full.named_parameters() if n.startswith("fc1.") or ".atten." in n)
    fx.meta["reference"]["params_1024"] = n_params(full)
    fx.meta["reference"]["dead_params_1024"] = dead

    def qkv(name, w):
        q, k, v = w.chunk(3, dim=0)
        base = name.rsplit(".", 2)[0]  # context.attn
        leaf = name.rsplit(".", 1)[1]
        return {f"{base}.q.{leaf}": q, f"{base}.k.{leaf}": k, f"{base}.v.{leaf}": v}

    fx.state_dict = rename_state_dict(
        ref.state_dict(),
        [(r"softfilter\.layers\.(0|2)\.(weight|bias)", r"soft_filter.score.\1.\2"),
         (r"attens\.0\.to_qkv\.(weight|bias)", r"context.attn.qkv.\1"),
         (r"attens\.0\.to_out\.0\.(weight|bias)", r"context.attn.out.0.\1"),
         *gated("amil", "pool.score"), (r"classifier\.(weight|bias)", r"head.\1")],
        drop=[r"fc1\..*", r"attens\.0\.atten\..*"], transforms={r"context\.attn\.qkv\..*": qkv})
    rng = np.random.default_rng(SEED + 5)
    fx.bags = [flat_bag(rng, 60, IN_DIM, "scmil-0"), flat_bag(rng, 90, IN_DIM, "scmil-1")]
    ref64 = double(ref)
    clustering = []

    def runner(cluster_size):
        def run(x, f64):
            m = pick(f64, ref, ref64)
            m.cluster_size = cluster_size
            for layer in m.attens:
                layer.cluster_size = cluster_size
            start = len(calls)
            c = fx.bags[run.bag]["coords"]["20x"][None].to(x["20x"].dtype)
            logits = m(x["20x"][None], coords=c)["logits"]
            if f64 and run.record:
                assert len(calls) == start + 1
                clustering.append({"case": run.case, "input": calls[-1]["input"].double(),
                                   "labels": calls[-1]["labels"]})
                run.record = False
            return {"logits": logits}
        return run

    for cs in (64, 8):
        for i in range(len(fx.bags)):
            run = runner(cs)
            run.bag, run.record, run.case = i, True, f"eval-{i}-cluster{cs}"
            fx.eval_case(run.case, i, run, hparams={} if cs == 64 else {"cluster_size": cs})
    fx.training["clustering"] = clustering
    fx.note("The k-means input is [0.8 z(x~), 0.2 z(coords)] with z a scalar z-score using torch.std (unbiased); "
            "training.clustering holds it per case (float64) with the labels the stand-in k-means gave it.")
    fx.note(f"Reference parameters at 1024: {fx.meta['reference']['params_1024']} of which {dead} dead (fc1 and the "
            "unused SelfAttention): milbench builds the used ones.")
    return [fx]


def fx_protosurv(a) -> list[Fixture]:
    """ProtoSurv (wjx-error/ProtoSurv models/model_protosurv_v1.py::LINKX_PROTO_oldv) at the protosurv.yml
    configuration with small widths. Tissue types are given per node (milbench: bag.extras['tissue_labels']);
    pre-prototypes (milbench: the fitted centroids) stand in for a type the patient lacks. Hazard head: the spec's
    Linear(768 -> 4) in place of the Cox layer; case cox: the original Linear(d -> 1, no bias)."""
    from torch_geometric.data import Data

    mod = import_repo(a.protosurv, "models.model_protosurv_v1", packages=("models", "models.utils"))
    cfg = dict(input_dim=IN_DIM, dropout_rate=0.25, num_layers=4, edge_agg="spatial", hidden_dim=16, nr_types=5,
               num_proto=8, proto_iters=2, proto_n_head=3, fusion_layer_to_p=4, fusion_n_head=3, dim_proto=24,
               proto_fc_hidden_dim=16, pre_proto=False, pre_proto_pth=None)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the constructor prints
        ref = build(SEED, lambda: mod.LINKX_PROTO_oldv(**cfg))
        full = mod.LINKX_PROTO_oldv(**{**cfg, "input_dim": 1024, "hidden_dim": 128, "dim_proto": 768,
                                       "proto_fc_hidden_dim": 512})
    cox_head = ref.risk_prediction_layer
    torch.manual_seed(SEED + 6)
    ref.risk_prediction_layer = nn.Linear(24, N_BINS)  # the spec's discrete head (milbench default)
    ref.eval()
    rng = np.random.default_rng(SEED + 6)
    pre = torch.from_numpy(rng.normal(size=(5, IN_DIM)).astype(np.float32))
    ref.ProtoGNN.pre_prototypes = [pre[i] for i in range(5)]  # only used for a type the patient lacks
    hp = {"hidden": 16, "dim_proto": 24, "proto_hidden": 16, "n_types": 5, "protos_per_type": 8, "proto_iters": 2,
          "proto_heads": 3, "fusion_layers": 4, "fusion_heads": 3}
    fx = Fixture("protosurv", "protosurv", hp, "wjx-error/ProtoSurv", a.protosurv,
                 ["models/model_protosurv_v1.py", "models/utils/proto_utils_v1.py", "models/utils/model_utils.py",
                  "configs/protosurv.yml"],
                 "LINKX_PROTO_oldv(input_dim=32, dropout_rate=0.25, num_layers=4, hidden_dim=16, nr_types=5, "
                 "num_proto=8, proto_iters=2, proto_n_head=3, fusion_layer_to_p=4, fusion_n_head=3, dim_proto=24, "
                 "proto_fc_hidden_dim=16); risk_prediction_layer = Linear(24, 4) (case cox: the original); "
                 "ProtoGNN.pre_prototypes = 5 fixed vectors; torch.einsum made contiguous (see notes)")
    fx.meta["reference"]["params_1024"] = n_params(full)
    dead = sum(p.numel() for n, p in full.named_parameters()
               if n.startswith(("ProtoGNN.norm.", "ProtoGNN.lin.", "ProtoGNN.proto_mlp.")))
    fx.meta["reference"]["dead_params_1024"] = dead
    del full

    def shift(repl: str) -> str:  # group numbers move up by one behind the layer index group
        return re.sub(r"\\(\d)", lambda m: "\\" + str(int(m.group(1)) + 1), repl)

    attn = [(r"to_q\.(weight|bias)", r"q.\1"), (r"to_k\.(weight|bias)", r"k.\1"), (r"to_v\.(weight|bias)", r"v.\1"),
            (r"out_proj\.(weight|bias)", r"out.0.\1"), (r"att_norm\.(weight|bias)", r"attn_norm.\1"),
            (r"post_norm\.(weight|bias)", r"mlp_norm.\1"), (r"mlp\.([013])\.(weight|bias)", r"mlp.\1.\2")]
    rules = [(r"pre_fc\.([01])\.(weight|bias)", r"pre_fc.\1.\2"),
             (r"total_layers\.(\d)\.(conv|norm)\.(.*)", r"gcn.layers.\1.\2.\3"),
             (r"post_fc\.([014])\.(weight|bias)", r"post_fc.\1.\2"),
             (r"ProtoGNN\.proto_attention\.proto_logsigma", "proto_logsigma"),
             (r"ProtoGNN\.proto_attention\.rand_mul", "proto_offsets"),
             (r"ProtoGNN\.proto_attention\.proto_mlp\.([01])\.(weight|bias)", r"proto_mlp.\1.\2"),
             *[(rf"ProtoGNN\.proto_attention\.layers\.(\d+)\.{p}", rf"refine.\1.{shift(r)}") for p, r in attn],
             *[(rf"proto_fusion_to_p\.layers\.(\d+)\.{p}", rf"fusion.\1.{shift(r)}") for p, r in attn],
             (r"risk_prediction_layer\.(weight|bias)", r"head.\1"),
             (r"mlp_comp\.([013])\.(weight|bias)", r"mlp_comp.\1.\2")]
    drop = [r"total_layers\.\d\.layer\..*", r"ProtoGNN\.(norm|lin|proto_mlp)\..*"]
    fx.state_dict = rename_state_dict(ref.state_dict(), rules, drop)
    fx.state_dict["centroids"] = pre.clone()
    fx.state_dict["priors_fitted"] = torch.tensor(True)

    bags = [flat_bag(rng, 45, IN_DIM, "protosurv-0"), flat_bag(rng, 52, IN_DIM, "protosurv-1")]
    for i, b in enumerate(bags):
        n = b["features"]["20x"].shape[0]
        b["extras"]["graph"] = {"edge_index": knn_edges(b["coords"]["20x"].numpy(), 4), "kind": "spatial", "k": 4}
        types = rng.integers(0, 5 if i == 0 else 4, size=n)  # bag 1 has no type-4 node: its pre-prototype is used
        b["extras"]["tissue_labels"] = torch.from_numpy(types.astype(np.int64))
    fx.bags = bags
    ref64 = double(ref)

    def runner(model32, model64):
        def run(x, f64):
            b = fx.bags[run.bag]
            data = Data(x=x["20x"], edge_index=b["extras"]["graph"]["edge_index"],
                        batch=torch.zeros(len(x["20x"]), dtype=torch.long),
                        patch_classify_type=b["extras"]["tissue_labels"])
            state = random.getstate()
            with contiguous_einsum():
                risk = pick(f64, model32, model64)(data)[1]
            random.setstate(state)
            return {"logits": risk.reshape(1, -1)}
        return run

    run = runner(ref, ref64)
    try:  # the reference as it is: .view on a non-contiguous einsum output
        with reference_runtime(False):
            ref(Data(x=bags[0]["features"]["20x"], edge_index=bags[0]["extras"]["graph"]["edge_index"],
                     batch=torch.zeros(45, dtype=torch.long), patch_classify_type=bags[0]["extras"]["tissue_labels"]))
        crash = "none"
    except RuntimeError as err:
        crash = f"RuntimeError: {str(err).splitlines()[0]}"
    fx.training["forward_as_is"] = crash
    fx.note(f"As released the forward fails ({crash}); torch.einsum's output is made contiguous for the golden run "
            "(the same values), which is milbench's reshape.")
    for i in range(len(bags)):
        run.bag = i
        fx.eval_case(f"eval-{i}", i, run)
    cox = copy.deepcopy(ref)
    cox.risk_prediction_layer = cox_head
    cox.eval()
    run_cox = runner(cox, double(cox))
    run_cox.bag = 0
    fx.eval_case("eval-0-cox", 0, run_cox, hparams={"head": "cox"}, weights={"head.weight": cox_head.weight.detach()},
                 drop_weights=["head.bias"])
    fx.note("The reference's type means exclude all-zero rows and fall back to pre_prototypes[t] for a missing type "
            "(bag 1 lacks type 4), milbench's fitted centroids here.")
    return [fx]


# ============================================================================================ multi-scale models


def fx_zoommil(a) -> list[Fixture]:
    """ZoomMIL (histocartography/zoommil zoommil/models/zoommil.py, utils/perturbedtopk.py) at the training
    configuration (dropout 0.25, k = 12, sigma 0.002, 100 samples) with widths out 32 / hidden 16."""
    mod = import_repo(a.zoommil, "zoommil.models.zoommil", packages=("zoommil", "zoommil.models", "zoommil.utils"))
    cfg = dict(in_feat_dim=IN_DIM, hidden_feat_dim=16, out_feat_dim=32, dropout=0.25, k_sample=12, k_sigma=0.002,
               n_cls=N_BINS)
    ref = build(SEED, lambda: mod.ZoomMIL(**cfg)).eval()
    fx = Fixture("zoommil", "zoommil", {"hidden": 32, "attn_dim": 16}, "histocartography/zoommil", a.zoommil,
                 ["zoommil/models/zoommil.py", "zoommil/utils/perturbedtopk.py", "zoommil/config/sample_config.json"],
                 "ZoomMIL(in_feat_dim=32, hidden_feat_dim=16, out_feat_dim=32, dropout=0.25, k_sample=12, "
                 "k_sigma=0.002, n_cls=4)")
    fx.meta["reference"]["params_1024"] = n_params(mod.ZoomMIL(**{**cfg, "in_feat_dim": 1024, "hidden_feat_dim": 256,
                                                                  "out_feat_dim": 512}))
    rules = []
    for mag, name in (("low", "low"), ("mid", "mid"), ("high", "high")):
        rules += [(rf"fc_{mag}_mag\.0\.(weight|bias)", rf"proj_{name}.0.\1"),
                  *gated(f"ga_{mag}_mag", f"pool_{name}.score")]
    rules += [*gated("aux_ga_low_mag", "select_low"), *gated("aux_ga_mid_mag", "select_mid"),
              (r"classify_head\.(weight|bias)", r"head.\1")]
    fx.state_dict = rename_state_dict(ref.state_dict(), rules)
    rng = np.random.default_rng(SEED + 7)
    fx.bags = [nested_bag(rng, 14, IN_DIM, "zoommil-0"),
               nested_bag(rng, 16, IN_DIM, "zoommil-1", drop={"10x": [5], "20x": [3, 40, 41]})]

    def inputs(x, b):
        h = fx.bags[b]["extras"]["hierarchy"]
        return (x["5x"][None], take_rows(x["10x"], h["children_10x_of_5x"].reshape(-1))[None],
                take_rows(x["20x"], h["children_20x_of_5x"].reshape(-1))[None])

    ref64 = double(ref)

    def run(x, f64):
        return {"logits": pick(f64, ref, ref64)(inputs(x, run.bag))[0]}

    for i in range(len(fx.bags)):
        run.bag = i
        fx.eval_case(f"eval-{i}", i, run)

    # --- training path 1: the whole model in training mode (dropout p = 0 so that only the top-k is random), with
    # the perturbation noise the authors' code drew, recorded for milbench to replay
    train64 = double(ref).train()
    for m in train64.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    normal = torch.normal
    for b in range(len(fx.bags)):
        noise: list[torch.Tensor] = []

        def recording_normal(*args, **kwargs):
            z = normal(*args, **kwargs)
            noise.append(z.detach().clone())
            return z

        x = leaves(fx.bags[b], torch.float64)
        torch.manual_seed(SEED + 100 + b)
        torch.normal = recording_normal
        try:
            with reference_runtime(True):
                logits = train64(inputs(x, b))[0]
        finally:
            torch.normal = normal
        params = dict(train64.named_parameters())
        names = list(params)
        g = torch.autograd.grad((logits * fx.cotangent).sum(), [*x.values(), *params.values()], allow_unused=True)
        gx = {s: gi.detach() for s, gi in zip(x, g[: len(x)])}
        gp = {n: (torch.zeros_like(params[n]) if gi is None else gi).detach() for n, gi in zip(names, g[len(x):])}
        fx.cases.append({
            "name": f"train-{b}", "bag": b, "mode": "train", "hparams": {"dropout": 0.0},
            "noise": [z.reshape(z.shape[-2], z.shape[-1]).double() for z in noise],  # [n_samples, N] per top-k call
            "logits64": logits.detach().clone(), "grads64": gx,
            # the auxiliary (selection) attentions learn only through the top-k backward
            "param_grads64": {k: v for k, v in rename_state_dict(gp, rules).items() if k.startswith("select_")},
        })
    fx.note("Training cases: dropout off (p = 0) in both models so that the perturbed top-k is the only random "
            "step; 'noise' lists the Gaussian draws of each PerturbedTopK call in order ([100, N] each). The authors' "
            "backward keeps only the diagonal terms of the perturbed-maximum Jacobian (issue 18).")

    # --- training path 2: the operator alone, with its noise, forward indicator and backward, two sigmas
    ops = []
    for sigma in (0.002, 0.05):
        gen = torch.Generator().manual_seed(SEED + 200)
        scores = torch.softmax(torch.randn(20, generator=gen, dtype=torch.float64) * 0.5, 0)
        upstream = torch.randn(12, 20, generator=gen, dtype=torch.float64)
        s = scores.clone()[None].requires_grad_(True)
        noise = []

        def recording_normal(*args, **kwargs):
            z = normal(*args, **kwargs)
            noise.append(z.detach().clone())
            return z

        torch.manual_seed(SEED + 300)
        torch.normal = recording_normal
        try:
            with reference_runtime(True):
                ind = mod.PerturbedTopK(k=12, num_samples=100, sigma=sigma)(s)
        finally:
            torch.normal = normal
        (g_authors,) = torch.autograd.grad((ind * upstream[None]).sum(), s)
        z = noise[0][0].double()  # [n, N]
        idx = torch.topk(scores[None] + sigma * z, 12, dim=-1).indices.sort(-1).values  # [n, k]
        one_hot = torch.nn.functional.one_hot(idx, 20).double()  # [n, k, N]
        g_full = z.T @ torch.einsum("nkd,kd->n", one_hot, upstream) / (100 * sigma)  # E[<g, Y(s + sigma Z)> Z] / sigma
        ops.append({"scores": scores, "k": 12, "n_samples": 100, "sigma": sigma, "noise": z, "upstream": upstream,
                    "indicator": ind.detach()[0], "grad_authors": g_authors[0], "grad_full": g_full})
    fx.training["perturbed_topk"] = ops
    fx.note("training.perturbed_topk: the authors' PerturbedTopKFunction on fixed scores; grad_authors is its "
            "backward (diagonal: sum_s,k g[k,d] Y_s[k,d] Z[s,d] / (n sigma)); grad_full is the perturbed-maximum "
            "estimator sum_s Z[s,d] <g, Y_s> / (n sigma) from the same draws (Berthet et al. 2020).")
    return [fx]


def fx_mustmil(a) -> list[Fixture]:
    """MuSTMIL: the MIL_model class of ilmaro8/MuSTMIL train/training_multi_scale.py, executed alone (the script's
    module level downloads a backbone and parses arguments), with the globals it reads set as the README's default
    run (resnet34 embedding: E = 128, D = 64; multilabel K = N_CLASSES = 4; features given, no CNN)."""
    import torch.nn.functional as F

    def namespace(width):
        return {"torch": torch, "F": F, "copy": copy,
                "pre_trained_network": nn.Sequential(nn.Identity(), nn.Identity()),
                "fc_input_features": width, "N_CLASSES": N_BINS, "EMBEDDING_bool": True, "CNN_TO_USE": "resnet34",
                "TASK": "multilabel", "device": torch.device("cpu")}

    script = Path(a.mustmil) / "train" / "training_multi_scale.py"
    cls = load_class_from_script(script, "MIL_model", namespace(IN_DIM))
    ref = build(SEED, cls).eval()
    fx = Fixture("mustmil", "mustmil", {}, "ilmaro8/MuSTMIL", a.mustmil, ["train/training_multi_scale.py (MIL_model)"],
                 "MIL_model() with CNN_TO_USE='resnet34', EMBEDDING_bool=True, TASK='multilabel', N_CLASSES=4, "
                 "fc_input_features=32; conv_layers unused (features given); scale 0 = 5x, scale 1 = 10x")
    fx.meta["reference"]["params_1024"] = n_params(load_class_from_script(script, "MIL_model", namespace(1024))())
    scales = ("5x", "10x")
    rules = [(rf"embeddings\.{i}\.(weight|bias)", rf"embed.{s}.\1") for i, s in enumerate(scales)]
    rules += [(rf"attentions\.{i}\.0\.(weight|bias)", rf"attention.{s}.attn_v.\1") for i, s in enumerate(scales)]
    rules += [(rf"attentions\.{i}\.2\.(weight|bias)", rf"attention.{s}.attn_w.\1") for i, s in enumerate(scales)]
    rules += [(rf"embeddings_fc\.{i}\.0\.(weight|bias)", rf"scale_head.{s}.\1") for i, s in enumerate(scales)]
    rules += [(r"attention_general\.0\.(weight|bias)", r"joint_attention.attn_v.\1"),
              (r"attention_general\.2\.(weight|bias)", r"joint_attention.attn_w.\1"),
              (r"classifier\.(weight|bias)", r"head.\1")]
    fx.state_dict = rename_state_dict(ref.state_dict(), rules)
    rng = np.random.default_rng(SEED + 8)
    fx.bags = [nested_bag(rng, 4, IN_DIM, "mustmil-0"), nested_bag(rng, 5, IN_DIM, "mustmil-1", drop={"5x": [2]})]
    ref64 = double(ref)

    def run(x, f64):
        m = pick(f64, ref, ref64)
        parent = fx.bags[run.bag]["extras"]["hierarchy"]["parent_5x_of_10x"]
        rows = (parent >= 0).nonzero().squeeze(1)  # 10x patches inside a 5x patch, each with that parent
        heads, hs = [], []
        for head in (*[fc[0] for fc in m.embeddings_fc], m.classifier):
            seen, h = capture_output(head)
            heads.append(seen)
            hs.append(h)
        m(None, [x["5x"][parent[rows]], x["10x"][rows]], "multi_scale", None)
        for h in hs:
            h.remove()
        return {"logits": heads[-1][0], "tasks": {s: heads[i][0] for i, s in enumerate(scales)}}

    for i in range(len(fx.bags)):
        run.bag = i
        fx.eval_case(f"eval-{i}", i, run)
    fx.note("The forward returns clamped sigmoids; the logits are the outputs of classifier and embeddings_fc[i] "
            "(forward hooks). Bag 1 lacks a 5x patch: its four 10x children have no parent and are dropped.")
    return [fx]


def fx_csmil(a) -> list[Fixture]:
    """CS-MIL (hrlblab/CS-MIL Train_Test_Code/DeepAttnMISL_model_no21.py, the model MIL_global_Stage1_Training.py
    imports) and its bag sampling (MIL_dataloader_csv_clustering_pair_stack.py with the scripts' arguments
    mean_bag_length=3, var_bag_length=1, cluster_list=[0..7])."""
    code = Path(a.csmil) / "Train_Test_Code"
    mod = import_repo(code, "DeepAttnMISL_model_no21", packages=())

    def make():
        m = mod.DeepAttnMIL_Surv(cluster_num=8)
        m.embedding_net[0] = nn.Conv2d(IN_DIM, 64, 1)  # Conv2d(2048, 64, 1) is hard-coded
        m.fc6[3] = nn.Linear(32, N_BINS)  # the spec's hazard head in place of Linear(32, 1) + Sigmoid
        return m

    ref = build(SEED, make).eval()
    fx = Fixture("csmil", "csmil", {}, "hrlblab/CS-MIL", a.csmil,
                 ["Train_Test_Code/DeepAttnMISL_model_no21.py", "Train_Test_Code/MIL_global_Stage1_Training.py",
                  "Train_Test_Code/MIL_global_Stage1_Testing.py",
                  "Train_Test_Code/MIL_dataloader_csv_clustering_pair_stack.py"],
                 "DeepAttnMIL_Surv(cluster_num=8); embedding_net[0] = Conv2d(32, 64, 1), fc6[3] = Linear(32, 4) "
                 "(logits = its output, before the Sigmoid)")
    full = mod.DeepAttnMIL_Surv(cluster_num=8)
    full.fc6[3] = nn.Linear(32, N_BINS)
    fx.meta["reference"]["params_1024"] = n_params(full) - 2048 * 64 + 1024 * 64  # input width 1024
    fx.meta["reference"]["params_2048"] = n_params(full)
    def conv(name, w):  # a 1x1 convolution's weight as a linear layer's
        return w.reshape(w.shape[0], -1) if name.endswith("weight") else w

    fx.state_dict = rename_state_dict(ref.state_dict(), [
        (r"embedding_net\.0\.(weight|bias)", r"embed.0.\1"),
        (r"res_attention\.0\.(weight|bias)", r"scale_attention.attn_v.\1"),
        (r"res_attention\.2\.(weight|bias)", r"scale_attention.attn_w.\1"),
        (r"attention\.0\.(weight|bias)", r"instance_attention.attn_v.\1"),
        (r"attention\.2\.(weight|bias)", r"instance_attention.attn_w.\1"),
        (r"fc6\.0\.(weight|bias)", r"fc.0.\1"), (r"fc6\.3\.(weight|bias)", r"head.\1")],
        transforms={r"(embed\.0|scale_attention\.attn_[vw])\.weight": conv})
    rng = np.random.default_rng(SEED + 9)
    fx.bags = [nested_bag(rng, 3, IN_DIM, "csmil-0"), nested_bag(rng, 4, IN_DIM, "csmil-1")]
    # cluster labels of the 20x patches (the reference reads them from per-WSI k-means files): sizes 1..7 and more
    for b in fx.bags:
        n = b["features"]["20x"].shape[0]
        sizes = [1, 2, 3, 4, 5, 6, 7]
        labels = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)] + [np.full(n - sum(sizes), 7)])
        b["extras"]["clusters"] = torch.from_numpy(rng.permutation(labels).astype(np.int64))
    ref64 = double(ref)

    def run(x, f64):
        b = fx.bags[run.bag]
        h = b["extras"]["hierarchy"]
        stacked = torch.stack([x["20x"], take_rows(x["10x"], h["parent_10x_of_20x"]),
                               take_rows(x["5x"], h["parent_5x_of_20x"])], dim=2)  # [n, D, 3]
        labels = b["extras"]["clusters"]
        data, mask = [], []
        for c in range(8):  # every instance once, grouped by cluster (evaluation on the whole bag)
            rows = (labels == c).nonzero().squeeze(1)
            part = stacked[rows] if len(rows) else torch.zeros(1, IN_DIM, 3, dtype=stacked.dtype)
            data.append(part.unsqueeze(3))
            mask += [1.0] * len(rows) if len(rows) else [0.0]
        m = pick(f64, ref, ref64)
        seen, hk = capture_output(m.fc6[3])
        m(data, torch.tensor([mask], dtype=stacked.dtype))
        hk.remove()
        return {"logits": seen[0].reshape(1, -1)}

    for i in range(len(fx.bags)):
        run.bag = i
        fx.eval_case(f"eval-{i}", i, run)
    fx.note("Eval cases give the reference every instance once (grouped by cluster), milbench's evaluation; the "
            "reference's own evaluation re-samples as in training (sample_in_eval=True).")
    fx.training["sampling"] = csmil_sampling(a, fx.bags[1]["extras"]["clusters"])
    return [fx]


def csmil_sampling(a, labels: torch.Tensor, draws: int = 1000) -> dict:
    """Run the authors' MILBags._create_bags ``draws`` times on one slide whose clusters are ``labels`` and record
    what it drew: the bag length of each draw (from its RandomState), the instances per cluster and which."""
    import tempfile

    import pandas as pd

    stub_modules(["torchvision", "imgaug.augmenters"], **{"torchvision.datasets": None, "torchvision.transforms": None})
    had_int = hasattr(np, "int")
    # np.int was removed in NumPy 1.24 and int() of a 1-element array is an error in NumPy 2.4; the loader calls
    # np.int(RandomState.normal(mean, var, 1)): the old meaning, truncation of the one value, restored
    np.int = lambda v: int(np.asarray(v).reshape(-1)[0]) if np.size(v) == 1 else int(v)
    labels_np = labels.numpy()
    try:
        loader = import_repo(Path(a.csmil) / "Train_Test_Code", "MIL_dataloader_csv_clustering_pair_stack", packages=())
        n = len(labels)
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i in range(n):  # feature files whose values name the instance (2048-d, as the loader expects)
                for size in (256, 512, 1024):
                    p = Path(tmp) / f"size{size}" / f"{i}.npy"
                    p.parent.mkdir(exist_ok=True)
                    np.save(p, np.full(2048, float(i)))
                paths.append(str(Path(tmp) / "size256" / f"{i}.npy"))
            bags = loader.MILBags.__new__(loader.MILBags)
            lengths: list[int] = []

            class RecordingState(np.random.RandomState):
                def normal(self, *args, **kwargs):
                    v = super().normal(*args, **kwargs)
                    lengths.append(max(1, int(v[0])))  # np.int truncates; the loader then raises < 1 to 1
                    return v

            frames = [pd.DataFrame({"root": [paths[i] for i in range(n) if labels_np[i] == c],
                                    "wsi_name": ["slide"] * int((labels_np == c).sum())}) for c in range(8)]
            bags.__dict__.update(cluster_target_list=list(range(8)), mean_bag_length=3, var_bag_length=1,
                                 cluster_num=8, r=RecordingState(1),
                                 clustercnt_list=[np.bincount(labels_np, minlength=8).astype(float)],
                                 cluster_list=[frames], label_list=[0], case_list=[None])
            random.seed(SEED)
            counts, ids, draw_of = [], [], []
            for t in range(draws):
                cluster_bag, _, _mask, _, skip = bags._create_bags(0)
                assert not skip
                per = []
                for c, feats in enumerate(cluster_bag):
                    got = feats[:, 0, 0].astype(int)
                    per.append(0 if mask_is_placeholder(feats) else len(got))
                    if per[-1]:
                        ids += got.tolist()
                        draw_of += [t] * len(got)
                counts.append(per)
    finally:
        if not had_int:
            del np.int
    return {"labels": labels.clone(), "mean_bag_length": 3, "var_bag_length": 1, "loader_seed": 1,
            "lengths": torch.tensor(lengths[:draws], dtype=torch.int16),
            "counts": torch.tensor(counts, dtype=torch.int16),
            "ids": torch.tensor(ids, dtype=torch.int16), "draw_of": torch.tensor(draw_of, dtype=torch.int16),
            "note": "one length L = max(1, int(N(3, 1))) per bag; min(L, cluster size) instances from every cluster, "
                    "drawn uniformly with replacement (RandomState.randint); MIL_global_Stage1_Training.py and "
                    "MIL_global_Stage1_Testing.py pass mean_bag_length=3, var_bag_length=1 for training, validation "
                    "and test"}


def mask_is_placeholder(feats: np.ndarray) -> bool:
    """An empty cluster's placeholder: one all-zero instance (instance 0's files hold zeros too, so check the
    placeholder's shape and dtype: the loader builds it as float32, real instances as float64)."""
    return feats.dtype == np.float32


def fx_crossfusion(a) -> list[Fixture]:
    """CrossFusion and its two ablations (RustinS/CrossFusion models/CrossFusion*.py) at train.sh's configuration
    (4 heads, 1 layer, dropout 0.3, attention dropout 0.2, mlp ratio 2) with embed_dim 16."""
    out = []
    heads, dim = 4, 16
    hp = {"embed_dim": dim, "n_heads": heads}
    rng = np.random.default_rng(SEED + 10)
    nested = [nested_bag(rng, 4, IN_DIM, "crossfusion-0"), nested_bag(rng, 3, IN_DIM, "crossfusion-1")]

    def block_rules(src: str, dst: str) -> list[tuple[str, str]]:
        """A Transformer (pre_layers, ppeg, post_layers) at ``src`` -> milbench's PadTransformer ``dst``."""
        r = []
        for part, new in (("pre_layers", "pre"), ("post_layers", "post")):
            r += [(rf"{src}\.{part}\.layers\.(\d+)\.0\.(weight|bias)", rf"{dst}.{new}.\1.norm1.\2"),
                  (rf"{src}\.{part}\.layers\.(\d+)\.1\.([qkv])_proj\.(weight|bias)", rf"{dst}.{new}.\1.attn.\2.\3"),
                  (rf"{src}\.{part}\.layers\.(\d+)\.1\.out_proj\.(weight|bias)", rf"{dst}.{new}.\1.attn.out.\2"),
                  (rf"{src}\.{part}\.layers\.(\d+)\.2\.(weight|bias)", rf"{dst}.{new}.\1.norm2.\2"),
                  (rf"{src}\.{part}\.layers\.(\d+)\.3\.net\.([03])\.(weight|bias)", rf"{dst}.{new}.\1.ffn.\2.\3")]
        r += [(rf"{src}\.ppeg\.proj\.(weight|bias)", rf"{dst}.ppeg.proj7.\1"),
              (rf"{src}\.ppeg\.proj1\.(weight|bias)", rf"{dst}.ppeg.proj5.\1"),
              (rf"{src}\.ppeg\.proj2\.(weight|bias)", rf"{dst}.ppeg.proj3.\1")]
        return r

    def cab_rules(src: str, dst: str) -> list[tuple[str, str]]:
        return [(rf"{src}\.([qkv])_proj\.(weight|bias)", rf"{dst}.attn.\1.\2"),
                (rf"{src}\.out_proj\.(weight|bias)", rf"{dst}.attn.out.\1"),
                (rf"{src}\.scale_embeddings", rf"{dst}.scale_embedding"),
                (rf"{src}_ln\.(weight|bias)", rf"{dst}.norm.\1"),
                (rf"{src}_ffn\.net\.([03])\.(weight|bias)", rf"{dst}.ffn.\1.\2")]

    conv_rules = [(r"conv_processor\.conv_block\.0\.proj\.(weight|bias)", r"fusion.conv.0.conv7.\1"),
                  (r"conv_processor\.conv_block\.0\.proj1\.(weight|bias)", r"fusion.conv.0.conv5.\1"),
                  (r"conv_processor\.conv_block\.0\.proj2\.(weight|bias)", r"fusion.conv.0.conv3.\1"),
                  (r"conv_processor\.conv_block\.0\.x_proj\.(weight|bias)", r"fusion.conv.0.shortcut.\1"),
                  (r"conv_processor\.linear\.([01])\.(weight|bias)", r"fusion.expand.\1.\2")]
    common = [(r"cls_token", "cls_token"), (r"mlp_head\.0\.(weight|bias)", r"head.\1"),
              (r"final_ln\.(weight|bias)", r"pt_final.norm.\1"), *block_rules("final_transformer", "pt_final")]

    variants = {
        "crossfusion": ("models.CrossFusion", "CrossFusion", [
            (r"c_lin_proj\.([01])\.(weight|bias)", r"embed_coarse.\1.\2"),
            (r"s_lin_proj\.([01])\.(weight|bias)", r"embed_source.\1.\2"),
            (r"f_lin_proj\.([01])\.(weight|bias)", r"embed_fine.\1.\2"),
            *cab_rules("c_cross_attn", "cross_coarse"), *cab_rules("f_cross_attn", "cross_fine"),
            *block_rules("c_transformer", "pt_coarse"), (r"c_transformer_ln\.(weight|bias)", r"pt_coarse.norm.\1"),
            *block_rules("f_transformer", "pt_fine"), (r"f_transformer_ln\.(weight|bias)", r"pt_fine.norm.\1"),
            *block_rules("s_transformer", "pt_source"), (r"s_transformer_ln\.(weight|bias)", r"pt_source.norm.\1"),
            (r"conv_processor\.conv3d\.(weight|bias)", r"fusion.scale_fusion.\1"), *conv_rules, *common]),
        "crossfusion_concat": ("models.CrossFusionConcat", "CrossFusionConcat", [
            (r"coarse_pre_cross_attn\.([01])\.(weight|bias)", r"embed_coarse.\1.\2"),
            (r"source_pre_cross_attn\.([01])\.(weight|bias)", r"embed_source.\1.\2"),
            (r"fine_pre_cross_attn\.([01])\.(weight|bias)", r"embed_fine.\1.\2"),
            *cab_rules("coarse_cross_attn", "cross_coarse"), *cab_rules("fine_cross_attn", "cross_fine"),
            *block_rules("coarse_transformer", "pt_coarse"), (r"coarse_ln\.(weight|bias)", r"pt_coarse.norm.\1"),
            *block_rules("fine_transformer", "pt_fine"), (r"fine_ln\.(weight|bias)", r"pt_fine.norm.\1"),
            *block_rules("source_transformer", "pt_source"), (r"source_ln\.(weight|bias)", r"pt_source.norm.\1"),
            (r"pre_final_linear\.([01])\.(weight|bias)", r"fusion.proj.\1.\2"), *common]),
        "crossfusion_single": ("models.CrossFusionSingle", "CrossFusionSingle", [
            (r"source_pre_cross_attn\.([01])\.(weight|bias)", r"embed.\1.\2"),
            *block_rules("source_transformer", "pt"), (r"source_ln\.(weight|bias)", r"pt.norm.\1"),
            *conv_rules, *common]),
    }
    for name, (module, cls_name, rules) in variants.items():
        mod = import_repo(a.crossfusion, module, extra_paths=[a.refdeps] if a.refdeps else ())
        for cls in ("CrossAttention", "MultiHeadAttention"):  # their constructors move weights to "cuda"
            if hasattr(mod, cls):
                init = getattr(mod, cls).__init__
                init.__defaults__ = tuple("cpu" if d == "cuda" else d for d in init.__defaults__)
        cls = getattr(mod, cls_name)
        ref = build(SEED, lambda: cls(embed_dim=dim, num_heads=heads, num_layers=1, backbone_dim=IN_DIM,
                                      dropout_rate=0.3, n_classes=N_BINS)).eval()
        fx = Fixture(name, name, hp, "RustinS/CrossFusion", a.crossfusion, [f"models/{cls_name}.py", "train.sh"],
                     f"{cls_name}(embed_dim=16, num_heads=4, num_layers=1, backbone_dim=32, dropout_rate=0.3, "
                     "n_classes=4); attention modules built on the CPU (their device default 'cuda' -> 'cpu')")
        fx.meta["reference"]["params_1024"] = n_params(cls(embed_dim=512, num_heads=4, num_layers=1, backbone_dim=1024,
                                                           n_classes=N_BINS))
        fx.state_dict = rename_state_dict(ref.state_dict(), rules)
        fx.bags = nested
        ref64 = double(ref)
        fixed, fixed64 = copy.deepcopy(ref), copy.deepcopy(ref64)
        for m in (*fixed.modules(), *fixed64.modules()):  # the fix: no attention dropout in eval
            if type(m).__name__ in ("MultiHeadAttention", "CrossAttention"):
                m.attn_dropout.p = 0.0

        def runner(m32, m64):
            def run(x, f64):
                return {"logits": pick(f64, m32, m64)(x["5x"][None], x["10x"][None], x["20x"][None])[3]}
            return run

        for i in range(len(nested)):
            fx.eval_case(f"eval-{i}", i, runner(fixed, fixed64))
        fx.eval_case("eval-0-dropout_in_eval", 0, runner(ref, ref64), hparams={"attn_dropout_in_eval": True},
                     seed=1234, float32=False)
        with torch.no_grad(), reference_runtime(False):
            xs = {s: f[None] for s, f in nested[0]["features"].items()}
            twice = [ref(xs["5x"], xs["10x"], xs["20x"])[3] for _ in range(2)]
            spread = (twice[0] - twice[1]).abs().max().item()
        fx.training["eval_passes_differ_by"] = spread
        fx.note(f"As released, two eval passes differ (max |logit difference| {spread:.3g} here): its attention "
                "dropout (0.2) is on in eval. Cases eval-i run it with p = 0 in eval (milbench's default); case "
                "eval-0-dropout_in_eval runs it as released after torch.manual_seed(1234) "
                "(milbench attn_dropout_in_eval=True draws the same masks from the same seed).")
        out.append(fx)
    return out


BUILDERS: dict[str, Callable] = {
    "amil": fx_amil, "dsmil": fx_dsmil, "transmil": fx_transmil, "graphs": fx_graphs, "scmil": fx_scmil,
    "protosurv": fx_protosurv, "zoommil": fx_zoommil, "mustmil": fx_mustmil, "csmil": fx_csmil,
    "crossfusion": fx_crossfusion,
}
def load_fixture(path: Path) -> dict:
    """Read a fixture written by :meth:`Fixture.save`."""
    return torch.load(io.BytesIO(lzma.decompress(Path(path).read_bytes())), weights_only=True)


NEEDS = {"amil": ("crossfusion", "patchgcn"), "dsmil": ("crossfusion", "dsmil"),
         "transmil": ("crossfusion", "transmil", "nystrom09"), "graphs": ("patchgcn",), "scmil": ("scmil",),
         "protosurv": ("protosurv",), "zoommil": ("zoommil",), "mustmil": ("mustmil",), "csmil": ("csmil",),
         "crossfusion": ("crossfusion",)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for repo in ("crossfusion", "patchgcn", "dsmil", "transmil", "nystrom09", "scmil", "protosurv", "zoommil",
                 "mustmil", "csmil"):
        p.add_argument(f"--{repo}", type=Path, help=f"checkout of the {repo} reference repository")
    p.add_argument("--refdeps", type=Path, help="folder of extra packages the reference code imports (einops)")
    p.add_argument("--out", type=Path, default=Path("tests/fixtures/golden"))
    p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BUILDERS)}")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.refdeps:
        sys.path.append(str(a.refdeps))
    chosen = [s for s in a.only.split(",") if s] or list(BUILDERS)
    missing = {k: [r for r in NEEDS[k] if getattr(a, r) is None] for k in chosen}
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        p.error("missing checkouts: " + "; ".join(f"{k} needs --{' --'.join(v)}" for k, v in missing.items()))
    for key in chosen:
        t = time.perf_counter()
        for fx in BUILDERS[key](a):
            ours = fx.check_milbench()
            path = fx.save(a.out)
            print(f"{fx.name:20s} {len(fx.cases):2d} cases  {path.stat().st_size / 1024:7.1f} KiB  reference params "
                  f"@1024 {fx.meta['reference']['params_1024']:>11,}  milbench {ours:>11,}  "
                  f"({time.perf_counter() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
