"""`milbench extract` through Typer, and `milbench run --model crossfusion` on what it wrote."""

import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from milbench import MilbenchError
from milbench.cli import app
from tests.extract.conftest import ENCODER
from tests.extract.wsi import write_table

runner = CliRunner()


def _args(slides, out, *extra):
    return ["extract", "--slides", str(slides), "--out", str(out), "--encoder", ENCODER, "--patch", "32",
            "--workers", "0", "--device", "cpu", *extra]


def test_extract_then_resume(slide_set, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("slide_a.svs", "slide_e.tif"):
        shutil.copy(slide_set[0] / name, slides)
    out = tmp_path / "features"
    res = runner.invoke(app, _args(slides, out, "--base-mag", "20", "--name", "qm", "--contact", "slide_e"))
    assert res.exit_code == 0, res.output
    assert "2 slide(s) extracted" in res.output and "--backbone qm" in res.output
    assert (out / "qm" / "x20" / "h5_files" / "slide_e.h5").is_file() and (out / "qm" / "contact_slide_e.png").is_file()
    again = runner.invoke(app, _args(slides, out, "--base-mag", "20", "--name", "qm"))
    assert again.exit_code == 0 and "0 slide(s) extracted" in again.output and "2 already done" in again.output


def test_a_failed_slide_fails_the_command_after_the_others(slide_set, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(slide_set[0] / "slide_e.tif", slides)  # records no magnification, and no --base-mag given
    res = runner.invoke(app, _args(slides, tmp_path / "out"))
    assert isinstance(res.exception, MilbenchError)
    assert "1 slide(s) failed, e.g. slide_e" in str(res.exception) and "--base-mag" in str(res.exception)


@pytest.mark.parametrize("extra, message", [(["--name", "a/b"], "plain folder name"),
                                            (["--mean", "0.5,0.5"], "three comma-separated"),
                                            (["--mags", "40"], "--mags"),
                                            (["--executor", "dask"], "--executor 'dask'")])
def test_bad_options_are_user_errors(slide_set, tmp_path, extra, message):
    res = runner.invoke(app, _args(slide_set[0], tmp_path, *extra))
    assert isinstance(res.exception, MilbenchError) and message in str(res.exception)


@pytest.mark.slow
def test_crossfusion_trains_on_the_extracted_root(extracted, tmp_path):
    table, splits = write_table(tmp_path, list(extracted.images))
    res = subprocess.run([sys.executable, "-m", "milbench.cli", "run", "--model", "crossfusion", "--cohort",
                          str(table), "--splits", str(splits), "--features", str(extracted.out), "--backbone",
                          "quadrant_means", "--epochs", "1", "--folds", "0", "--runs-dir", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    records = list((tmp_path / "runs").rglob("fold_0/record.json"))
    assert len(records) == 1 and "crossfusion" in str(records[0]) and "quadrant_means" in str(records[0])
