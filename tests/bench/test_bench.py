"""`milbench bench` and the fast paths it measures: packed bags, the device store, compiled blocks, bf16."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from milbench import MilbenchError
from milbench.bench.bags import ANCHOR_H100, PRESETS, nested_coords, parse_bag, random_bag
from milbench.bench.epoch import bench_epoch
from milbench.bench.step import bench_packed, bench_step
from milbench.bench.timing import build_model
from milbench.bench.report import markdown
from milbench.config.run import make_config
from milbench.data.bag import Bag
from milbench.training.device import DeviceBagStore
from milbench.training.steps import bag_loss, check_pack, packed_loss, train_epoch
from milbench.accel.compile import compile_blocks
from milbench.models.layers.segment import segment_argmax, segment_softmax
from milbench.models.registry import create_model
from milbench.survival.losses import get_loss
from tests.conftest import nested_bag

CPU = torch.device("cpu")
SIZES = [5, 17, 1, 9]  # patches per bag, one bag of a single patch


def test_parse_bag_presets_ratio_and_triples():
    assert (parse_bag("avg").n5, parse_bag("avg").n10, parse_bag("avg").n20) == PRESETS["avg"]
    assert parse_bag("MAX").n20 == 137_990
    one = parse_bag("1600")
    assert (one.n5, one.n10, one.n20) == (100, 400, 1600)  # the paper's 1:4:16
    assert parse_bag("4,10,40").n10 == 10
    assert (parse_bag("p90/16").n5, parse_bag("p90/16").n10, parse_bag("p90/16").n20) == (157, 625, 2500)
    for bad in ("huge", "0", "4,17,40", "4,16,65", "1,2", "avg/0"):
        with pytest.raises(MilbenchError, match="--bag"):
            parse_bag(bad)


def test_nested_coords_are_children_of_the_5x_patches():
    size = parse_bag("7,25,100")
    xy = nested_coords(size)
    assert [len(xy[s]) for s in ("5x", "10x", "20x")] == [7, 25, 100]
    parents = {tuple(c) for c in xy["5x"].tolist()}
    for scale in ("10x", "20x"):
        corner = (xy[scale] // 1024) * 1024  # the 5x patch (side 1024 level-0 px) holding each patch
        assert all(tuple(c) in parents for c in corner.tolist())
        assert len({tuple(c) for c in xy[scale].tolist()}) == len(xy[scale])


def test_random_bag_is_half_precision_and_builds_what_the_card_needs():
    amil = random_bag("amil", parse_bag("40"), 8, CPU)
    assert set(amil.features) == {"20x"} and amil.features["20x"].dtype == torch.float16 and not amil.extras
    must = random_bag("mustmil", parse_bag("3,12,48"), 8, CPU)
    assert must.features["10x"].shape == (12, 8) and "hierarchy" in must.extras


def _bags(in_dim: int = 12, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, in_dim, generator=gen) for n in SIZES]


def _segment() -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(SIZES)])


def test_segment_ops_match_per_bag_ops():
    scores = torch.randn(sum(SIZES), 3)
    seg = _segment()
    soft = segment_softmax(scores, seg, len(SIZES))
    arg = segment_argmax(scores, seg, len(SIZES))
    for i, part in enumerate(scores.split(SIZES)):
        start = sum(SIZES[:i])
        torch.testing.assert_close(soft[start : start + SIZES[i]], torch.softmax(part, dim=0))
        assert torch.equal(arg[i] - start, part.argmax(dim=0))
    tie = torch.tensor([[1.0], [3.0], [3.0]])
    assert segment_argmax(tie, torch.zeros(3, dtype=torch.long), 1).item() == 1  # first maximum, as argmax


@pytest.mark.parametrize("name", ["amil", "dsmil"])
def test_forward_packed_equals_one_bag_at_a_time(name):
    torch.manual_seed(0)
    model = create_model(name, in_dim=12).train()
    loss_fn = get_loss("nll", alpha=0.2)
    y, c = torch.tensor([0, 3, 1, 2]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    xs = _bags()
    single = [bag_loss(model, Bag(str(i), {"20x": x}), y[i : i + 1], c[i : i + 1], loss_fn, None)
              for i, x in enumerate(xs)]
    model.eval()
    single_out = [model(Bag(str(i), {"20x": x})) for i, x in enumerate(xs)]
    packed_out = model.forward_packed(torch.cat(xs), _segment(), len(xs))
    model.train()
    packed = packed_out.logits
    assert packed.shape == (4, 4)
    assert (packed - torch.cat([o.logits for o in single_out])).abs().max() < 1e-6
    assert set(packed_out.tasks) == set(single_out[0].tasks) == ({"max_instance"} if name == "dsmil" else set())
    for task, values in packed_out.tasks.items():  # one row per bag, each its own bag's task logits
        assert values.shape == (4, 4)
        assert (values - torch.cat([o.tasks[task] for o in single_out])).abs().max() < 1e-6
    # the training loss and its gradient: one packed pass = the bags accumulated one by one
    sum(single).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = packed_loss(model, [Bag(str(i), {"20x": x}) for i, x in enumerate(xs)], y, c, loss_fn, None)
    assert abs(total.item() - sum(single).item()) < 1e-5
    total.backward()
    for k, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[k].grad, g, rtol=1e-5, atol=1e-6)


def test_packing_is_refused_where_it_would_change_training():
    with pytest.raises(MilbenchError, match="cannot pack"):
        check_pack(create_model("transmil", in_dim=8), "transmil", 2, 32)
    with pytest.raises(MilbenchError, match="divide"):
        check_pack(create_model("amil", in_dim=8), "amil", 3, 32)
    with pytest.raises(MilbenchError, match="pack=1"):  # the Cox loss ranks a window, not a packed step
        check_pack(create_model("amil", in_dim=8), "amil", 4, 32, get_loss("cox"))
    check_pack(create_model("amil", in_dim=8), "amil", 4, 32, get_loss("ce", 0.2))
    with pytest.raises(MilbenchError, match="pack=8"):
        make_config("amil", "c", "small", {"pack": 8})  # the small recipe accumulates 4 bags
    assert make_config("amil", "c", "paper", {"pack": 8}).pack == 8
    assert make_config("amil", "c", "paper", {"pack": 1}).hash == make_config("amil", "c", "paper").hash
    assert make_config("amil", "c", "paper", {"pack": 8}).hash != make_config("amil", "c", "paper").hash


class _List:
    def __init__(self, bags):
        self.bags = bags

    def get(self, i, as_float=True):
        return self.bags[i]


@pytest.mark.parametrize("name", ["amil", "dsmil"])
def test_a_packed_epoch_trains_the_same_weights(name):
    """train_epoch with pack=4 (windows of 8 bags, a repeated bag, a last window of 4) ends where one bag per step
    does."""
    xs = _bags(seed=1) * 3  # 12 bags
    bags = _List([Bag(str(i), {"20x": x}) for i, x in enumerate(xs)])
    y = torch.tensor([0, 3, 1, 2] * 3)
    c = torch.tensor([0.0, 1.0, 0.0, 1.0] * 3)
    order = [5, 0, 11, 3, 3, 7, 1, 9, 2, 10, 4, 8]
    weights = []
    for pack in (1, 4):
        torch.manual_seed(0)
        model = create_model(name, in_dim=12).train()
        optim = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the gradient (Adam's sign-like first
        # step would turn float-rounding differences of near-zero gradients into lr-sized ones)
        total = train_epoch(model, bags, order, y, c, get_loss("nll", alpha=0.2), optim, grad_accum=8, pack=pack)
        weights.append((total.item(), [p.detach().clone() for p in model.parameters()]))
    assert abs(weights[0][0] - weights[1][0]) < 1e-4
    for a, b in zip(weights[0][1], weights[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_device_store_hands_out_float32_copies_and_keeps_its_bags_clean():
    store = DeviceBagStore(CPU)
    assert store.max_bytes == 0 and not store.fits(1)  # on the CPU the feature cache holds the bags
    half = Bag("a", {"20x": torch.randn(5, 4).half()})
    store.put("a", half)
    got = store.fetch("a", lambda: pytest.fail("stored"))
    assert got.features["20x"].dtype == torch.float32
    assert torch.equal(got.features["20x"], half.features["20x"].float())
    got.extras["scratch"] = len
    assert "scratch" not in store.fetch("a", lambda: None, as_float=False).extras
    assert store.fetch("b", lambda: half, as_float=False).features["20x"].dtype == torch.float16
    packing = DeviceBagStore(CPU, dtype=torch.bfloat16)  # packed steps keep the bags in the autocast dtype
    got = packing.fetch("a", lambda: half, as_float=False).features["20x"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, half.features["20x"].bfloat16())


def test_bench_step_reports_a_positive_time_and_the_parameter_count():
    record = bench_step("amil", parse_bag("64"), 16, CPU, dtype="fp32", steps=2, warmup=1)
    assert record["step_ms"] > 0 and len(record["step_ms_all"]) == 2
    assert record["params"] == sum(p.numel() for p in create_model("amil", in_dim=16).parameters())
    assert record["compile"] == "off" and record["peak_kind"] in ("rss_peak_rise", "rss_process_peak")


def test_bench_packed_compares_both_paths():
    record = bench_packed("dsmil", parse_bag("32"), 8, CPU, pack=4, dtype="fp32", n_bags=8, grad_accum=8, repeats=1)
    assert record["single_bags_per_s"] > 0 and record["packed_bags_per_s"] > 0
    assert record["speedup"] == pytest.approx(record["packed_bags_per_s"] / record["single_bags_per_s"])


@pytest.mark.slow
def test_compiled_blocks_compute_the_same_function_and_bf16_stays_close():
    """The fast path (compiled hot blocks, bf16 autocast) against the float32 eager model, on the CPU.

    aot_eager traces the blocks as inductor does (dynamic shapes, autograd) without generating kernels, so the test
    stays fast; the GPU benchmark runs inductor itself.
    """
    torch.manual_seed(0)
    eager = create_model("crossfusion", in_dim=16, embed_dim=32, n_heads=2, dropout=0.0, attn_dropout=0.0)
    fast = create_model("crossfusion", in_dim=16, embed_dim=32, n_heads=2, dropout=0.0, attn_dropout=0.0)
    fast.load_state_dict(eager.state_dict())
    assert compile_blocks(fast, backend="aot_eager") == 15  # 2 cross-attention + 8 layers + 4 PPEG + fusion
    loss_fn = get_loss("nll", alpha=0.2)
    y, c = torch.tensor([2]), torch.tensor([0.0])
    for seed, n5 in ((0, 3), (1, 5)):  # two bag sizes, one compilation
        bag = nested_bag(n5=n5, in_dim=16, seed=seed)
        out = [bag_loss(m, Bag("c", dict(bag.features)), y, c, loss_fn, None) for m in (eager, fast)]
        torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-6)
        for o in out:
            o.backward()
        for (name, p), q in zip(eager.named_parameters(), fast.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        eager.zero_grad(), fast.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fast(bag).logits.float()
        ref = eager(bag).logits
        assert ((low - ref).abs().max() / ref.abs().max()).item() < 5e-2  # bf16: 8 mantissa bits
    fast.eval()
    maps = fast(bag, return_attention=True).attention  # the attention path runs eagerly
    assert set(maps) == {"coarse", "fine", "source", "final"}


def test_markdown_puts_our_time_beside_the_anchor():
    record = {"model": "crossfusion", "bag": "avg", "n5": 895, "n10": 3449, "n20": 13496, "in_dim": 2048,
              "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "dtype": "bf16", "compile": "blocks",
              "step_ms": ANCHOR_H100[("crossfusion", "avg")][0] / 5, "peak_bytes": 2**30,
              "peak_kind": "cuda_max_allocated"}
    text = markdown([record, {"model": "transmil", "bag": "max", "error": "OutOfMemoryError: ..."}])
    assert "| 36.72 | 1.674 | 5.0x |" in text and "transmil max: OutOfMemoryError" in text


@pytest.mark.slow
def test_bench_epoch_runs_both_paths_from_disk(tmp_path):
    record = bench_epoch("amil", patients=4, size=parse_bag("2,6,20"), in_dim=8, device=CPU, workdir=tmp_path,
                         disk_slides=3, workers=0)
    assert record["reference"]["slides"] == 3 and record["reference"]["slides_per_s"] > 0
    assert record["milbench_disk"]["first_epoch_s"] > 0 and record["milbench_cached"]["patients"] == 4
    assert record["disk_bytes"] > 3 * 3 * 8 * 4  # float32 .pt and .h5 files were written
    assert not any(tmp_path.iterdir())  # and removed


def test_cli_bench_prints_json_records():
    from milbench.cli import app

    result = CliRunner().invoke(app, ["bench", "--model", "amil", "--bag", "32", "--in-dim", "8", "--device", "cpu",
                                      "--steps", "1", "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert records[0]["model"] == "amil" and records[0]["n20"] == 32 and records[0]["step_ms"] > 0


def test_cli_and_bench_import_without_the_statistics_libraries():
    """The GPU machine has no scikit-survival or lifelines: `milbench bench` must not need them."""
    code = ("import sys; sys.modules.update(sksurv=None, lifelines=None); import milbench.cli, milbench.bench.step; "
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-500:]


def test_compile_fallback_measures_the_eager_model(monkeypatch):

    def broken(model, backend="inductor"):
        model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no compiler here"))
        return 1

    import milbench.bench.timing as timing

    monkeypatch.setattr(timing, "compile_blocks", broken)
    record = bench_step("amil", parse_bag("16"), 8, CPU, dtype="fp32", steps=1, warmup=1, compile_mode="blocks")
    assert record["compile"] == "off" and "no compiler here" in record["compile_error"] and record["step_ms"] > 0
    assert build_model("amil", 8, CPU).training
    assert np.isfinite(record["step_ms"])


@pytest.mark.parametrize("name", ["amil", "dsmil"])
def test_packed_bf16_stays_within_bf16_of_one_bag_at_a_time(name):
    """Under bf16 autocast the engine packs the patches in bf16 (its contract with forward_packed)."""
    torch.manual_seed(0)
    model = create_model(name, in_dim=12).eval()
    xs = _bags(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        single = torch.cat([model(Bag(str(i), {"20x": x})).logits.float() for i, x in enumerate(xs)])
        packed = model.forward_packed(torch.cat(xs).bfloat16(), _segment(), len(xs)).logits.float()
    assert ((packed - single).abs().max() / single.abs().max()).item() < 2e-2
