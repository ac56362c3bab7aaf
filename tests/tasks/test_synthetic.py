import json
import re
from dataclasses import replace

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from milbench import MilbenchError
from milbench.tasks import synthetic
from milbench.tasks.synthetic import (GENERATOR_VERSION, MAGS, SIDE, builtin_cohort, feature_maps, generate_cohort, latent_summary, oracle_risk, simulate)
from milbench.tasks.synthetic import NECROSIS, SCENARIOS, TUMOUR

TINY = dict(scenario="mixed", patients=12, seed=0, size=0.25, in_dim=8)


def read_h5(root, mag, slide):
    with h5py.File(root / "features" / f"x{mag[:-1]}" / "h5_files" / f"{slide}.h5") as f:
        return f["features"][:], f["coords"][:], dict(f["coords"].attrs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("syn") / "cohort", **TINY)


def test_cohort_table_and_metadata(tiny):
    table = pd.read_csv(tiny / "cohort.csv")
    assert list(table.columns) == ["case_id", "slide_id", "survival_months", "censorship", "oracle_risk"]
    assert table.case_id.nunique() == 12 and table.slide_id.is_unique
    assert all(re.fullmatch(r"SYN-\d{4}", c) for c in table.case_id)
    assert all(re.fullmatch(rf"{c}-0[12]", s) for c, s in zip(table.case_id, table.slide_id))
    assert (table.groupby("case_id").size() == 2).any()  # some patients have two slides
    per_case = table.groupby("case_id")[["survival_months", "censorship", "oracle_risk"]].nunique()
    assert (per_case == 1).all().all()  # patient-level labels repeated on each slide row
    assert set(table.censorship) <= {0, 1} and (table.survival_months > 0).all()
    meta = json.loads((tiny / "synthetic.json").read_text())
    assert {k: meta[k] for k in TINY} == TINY
    assert meta["generator_version"] == GENERATOR_VERSION and meta["censoring"] == 0.7
    assert 0.5 < meta["oracle_c_index"] <= 1


def test_splits_are_patient_level_stratified_clam_files(tiny):
    cases = set(pd.read_csv(tiny / "cohort.csv").case_id)
    censored = pd.read_csv(tiny / "cohort.csv").groupby("case_id").censorship.first()
    vals = []
    for k in range(5):
        path = tiny / "splits" / f"splits_{k}.csv"
        assert path.read_text().splitlines()[0] == ",train,val"
        split = pd.read_csv(path, index_col=0)
        train, val = set(split.train.dropna()), set(split.val.dropna())
        assert split.val.isna().any() and not split.train.isna().any()  # shorter column padded with empty cells
        assert train | val == cases and not train & val
        vals.append(val)
    assert sorted(c for v in vals for c in v) == sorted(cases)  # each patient held out exactly once
    events = [sum(censored[c] == 0 for c in v) for v in vals]
    assert max(events) - min(events) <= 1


def test_h5_files_have_clam_datasets(tiny):
    for slide in pd.read_csv(tiny / "cohort.csv").slide_id:
        for mag in MAGS:
            x, c, attrs = read_h5(tiny, mag, slide)
            assert x.dtype == np.float32 and x.shape[1] == 8 and np.isfinite(x).all()
            assert c.dtype == np.int64 and c.shape == (len(x), 2)
            assert attrs["patch_size"] == 256 and attrs["patch_level"] == 0


def test_patch_counts_keep_the_1_4_16_ratio(tiny):
    totals = dict.fromkeys(MAGS, 0)
    for slide in pd.read_csv(tiny / "cohort.csv").slide_id:
        n = {mag: len(read_h5(tiny, mag, slide)[0]) for mag in MAGS}
        assert 0.6 * 4 * n["5x"] <= n["10x"] <= 4 * n["5x"] and 0.6 * 16 * n["5x"] <= n["20x"] <= 16 * n["5x"]
        totals = {m: totals[m] + n[m] for m in MAGS}
    assert 3.6 < totals["10x"] / totals["5x"] < 4 and 14.4 < totals["20x"] / totals["5x"] < 16  # a few dropped
    assert 2 <= totals["5x"] / len(pd.read_csv(tiny / "cohort.csv")) <= 6  # 16 * size on average


def test_patches_nest_inside_5x_patches_of_their_slide(tiny):
    for slide in pd.read_csv(tiny / "cohort.csv").slide_id:
        c5 = read_h5(tiny, "5x", slide)[1]
        for mag, most in (("10x", 4), ("20x", 16)):
            c = read_h5(tiny, mag, slide)[1]
            inside = ((c[:, None] >= c5[None]) & (c[:, None] < c5[None] + SIDE["5x"])).all(-1)
            assert (inside.sum(1) == 1).all()  # every child lies in exactly one 5x patch
            assert inside.sum(0).max() <= most
            assert ((c - c5[inside.argmax(1)]) % SIDE[mag] == 0).all()  # on the parent's grid


def test_features_show_the_latent_states(tiny):
    sim = simulate(**{k: v for k, v in TINY.items() if k != "in_dim"})
    maps = feature_maps(TINY["seed"], TINY["in_dim"])
    slides = [s for p in sim.patients for s in p.slides]
    x5 = np.concatenate([read_h5(tiny, "5x", s.slide_id)[0] for s in slides])
    x20 = np.concatenate([read_h5(tiny, "20x", s.slide_id)[0] for s in slides])
    for s in slides:
        assert np.array_equal(read_h5(tiny, "20x", s.slide_id)[1], s.coords["20x"])
    tissue = np.concatenate([s.tissue["5x"] for s in slides])
    events = np.concatenate([s.events["20x"] for s in slides])
    assert np.mean((x5 @ maps["5x"][:4].T).argmax(1) == tissue) > 0.9  # 5x shows the coarse type
    w = maps["20x"][4]
    assert np.mean((x20 @ w / (w @ w) > 0.5) == events) > 0.9  # 20x shows the fine events


def test_censored_fraction_matches_target():
    for target in (0.7, 0.3):
        sim = simulate("coarse", 200, seed=1, size=0.25, censoring=target)
        assert abs(np.mean([p.censored for p in sim.patients]) - target) < 0.02
        assert (sim.table.censorship == 1).mean() == pytest.approx(target, abs=0.05)
    assert not any(p.censored for p in simulate("fine", 20, seed=1, size=0.25, censoring=0).patients)


def test_same_seed_same_files_other_seed_different(tiny, tmp_path):
    again = generate_cohort(tmp_path / "again", **TINY)
    other = generate_cohort(tmp_path / "other", **{**TINY, "seed": 1})
    assert (tiny / "cohort.csv").read_text() == (again / "cohort.csv").read_text()
    assert (tiny / "splits" / "splits_3.csv").read_text() == (again / "splits" / "splits_3.csv").read_text()
    for slide in pd.read_csv(tiny / "cohort.csv").slide_id:
        for mag in MAGS:
            for a, b in zip(read_h5(tiny, mag, slide)[:2], read_h5(again, mag, slide)[:2]):
                assert np.array_equal(a, b)
    assert (tiny / "cohort.csv").read_text() != (other / "cohort.csv").read_text()
    assert not np.array_equal(read_h5(tiny, "20x", "SYN-0001-01")[0][:4], read_h5(other, "20x", "SYN-0001-01")[0][:4])


@pytest.mark.parametrize("scenario,latent", [("coarse", "necrosis_fraction"), ("fine", "event_density"),
                                             ("cross-scale", "tumour_event_density")])
def test_oracle_risk_follows_the_scenario_latent(scenario, latent):
    sim = simulate(scenario, 200, seed=2, size=0.25)
    risk = [p.risk for p in sim.patients]
    assert spearmanr(risk, [p.latents[latent] for p in sim.patients])[0] > 0.99
    assert 0.7 < sim.oracle_c_index < 0.9
    assert np.allclose(sim.table.oracle_risk, [p.risk for p in sim.patients for _ in p.slides])


def test_mixed_risk_uses_all_three_latents():
    sim = simulate("mixed", 200, seed=2, size=0.25)
    for latent in synthetic.LATENTS:
        assert spearmanr([p.risk for p in sim.patients], [p.latents[latent] for p in sim.patients])[0] > 0.3


def _edit(slides, mag, field, where, value):
    """Copies of ``slides`` with ``field[mag]`` set to ``value`` where ``where(slide)`` is true."""
    out = []
    for s in slides:
        arr = getattr(s, field)[mag].copy()
        arr[where(s)] = value
        out.append(replace(s, **{field: {**getattr(s, field), mag: arr}}))
    return out


def test_each_scenario_reads_only_its_latent_states():
    sim = simulate("mixed", 30, seed=4, size=0.25)
    slides = next(p.slides for p in sim.patients
                  if all(0 < np.mean(s.tissue["20x"] == TUMOUR) < 1 for s in p.slides))
    risk = {sc: oracle_risk(sc, latent_summary(slides)) for sc in SCENARIOS}

    def changed(new_slides):
        return {sc for sc in SCENARIOS if not np.isclose(oracle_risk(sc, latent_summary(new_slides)), risk[sc])}

    outside = _edit(slides, "20x", "events", lambda s: s.tissue["20x"] != TUMOUR, 1.0)  # events outside tumour
    assert changed(outside) == {"fine", "mixed"}
    inside = _edit(slides, "20x", "events", lambda s: s.tissue["20x"] == TUMOUR, 1.0)  # events inside tumour
    assert changed(inside) == {"fine", "cross-scale", "mixed"}
    necrotic = _edit(slides, "5x", "tissue", lambda s: slice(None), NECROSIS)  # all 5x regions necrotic
    assert changed(necrotic) == {"coarse", "mixed"}


def test_bad_arguments_raise_one_line_errors(tmp_path):
    with pytest.raises(MilbenchError, match="coarse, fine, cross-scale, mixed") as err:
        generate_cohort(tmp_path, "medium", patients=12, seed=0)
    assert "\n" not in str(err.value)
    with pytest.raises(MilbenchError, match="at least 10 patients"):
        simulate("fine", 9, seed=0)
    with pytest.raises(MilbenchError, match="synthetic_cross-scale"):
        builtin_cohort("synthetic_medium")
    assert not (tmp_path / "synthetic.json").exists()


def test_interrupted_generation_leaves_no_metadata(tmp_path):
    calls = []

    def progress(done, total):
        calls.append((done, total))
        if done == 3:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        generate_cohort(tmp_path, **TINY, progress=progress)
    assert calls == [(1, 12), (2, 12), (3, 12)] and not (tmp_path / "synthetic.json").exists()


def test_builtin_cohort_generated_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MILBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(synthetic, "DEMO", {"patients": 10, "seed": 0, "size": 0.25, "in_dim": 8})
    root = builtin_cohort("synthetic")
    assert root == tmp_path / "synthetic" / f"synthetic-v{GENERATOR_VERSION}"
    assert json.loads((root / "synthetic.json").read_text())["scenario"] == "mixed"
    stamp = (root / "synthetic.json").stat().st_mtime_ns
    assert builtin_cohort("synthetic") == root and (root / "synthetic.json").stat().st_mtime_ns == stamp
    (root / "synthetic.json").unlink()  # as after an interrupted generation
    assert (builtin_cohort("synthetic") / "synthetic.json").exists()
    assert json.loads((builtin_cohort("synthetic_coarse") / "synthetic.json").read_text())["scenario"] == "coarse"
    assert sorted(p.name for p in (tmp_path / "synthetic").iterdir()) == ["synthetic-v1", "synthetic_coarse-v1"]
