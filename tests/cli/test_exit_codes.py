"""Exit codes mean what they say (issue 16, "Exit codes"; README "Claims").

- 0 only when every requested fold has a record: a fold held by another live driver is waited for, and taken
  over when that driver's claim goes stale (its process dead on this node, or no heartbeat for 10 minutes);
- 3 with ``--no-wait`` when folds are held elsewhere, with one line saying how many;
- 2 when the splits folder lacks a requested fold file (never a smaller cross-validation);
- 130 on Ctrl-C, with one line saying what was kept, no traceback and no partial record.

Each test starts from a store that already holds one completed record (fold 0, one epoch) and trains fold 1 for
``SLOW_EPOCHS`` epochs on bags of ~64 patches (a few seconds on a laptop core): long enough to be killed or
interrupted mid-fold; where a second driver must meet a held fold, the first one is paused while it holds it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.cli.helpers import (CohortFiles, records, run_milbench, snapshot, start_milbench, stop_group,
                               store_changes, wait_for)

pytestmark = pytest.mark.slow

SLOW_EPOCHS = 60
CLAIM_STALE_S = 600  # README: a claim not refreshed for 10 minutes is taken over


def _slow_args(cohort: CohortFiles, runs: Path, *extra: object) -> list[object]:
    cohort.opts["--epochs"] = SLOW_EPOCHS
    return [*cohort.run_args(runs), "--folds", 1, *extra]


def _claims(runs: Path) -> list[Path]:
    return sorted(runs.rglob("fold_1.claim"))


def _fold1_records(runs: Path) -> list[Path]:
    return [p for p in records(runs) if p.parent.name == "fold_1"]


def _output(prefix: Path) -> tuple[str, str]:
    return Path(f"{prefix}.stdout").read_text(), Path(f"{prefix}.stderr").read_text()


@pytest.fixture
def slow_cohort(make_cohort) -> CohortFiles:
    return make_cohort(patches=64)


@pytest.fixture
def started(tmp_path):
    """``started(args)``: a milbench driver in its own process group, killed (its group only) at teardown."""
    procs = []

    def start(args: list[object], name: str = "first"):
        proc = start_milbench(*args, out=tmp_path / name)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop_group(proc)
        proc.wait(timeout=30)


def _abandoned_claim(started, args: list[object], runs: Path) -> Path:
    """Start a driver, wait until it claims fold 1, kill it (SIGKILL to its group): its claim file stays behind."""
    first = started(args)
    claim = wait_for(lambda: _claims(runs), 180, "the first driver to claim fold 1", proc=first)[0]
    stop_group(first)
    first.wait(timeout=30)
    if not claim.exists() or _fold1_records(runs):
        pytest.fail("the killed driver left no claim behind (or finished fold 1 first): raise SLOW_EPOCHS")
    return claim


def _as_other_node(claim: Path, age_s: float) -> None:
    """Rewrite a claim as if a process on another node held it, its last heartbeat ``age_s`` seconds ago."""
    try:
        body = json.loads(claim.read_text() or "{}")
    except json.JSONDecodeError:
        body = {}
    then = time.time() - age_s
    body.update(host="lost-node", pid=4242, time=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(then)))
    if "node" in body:
        body["node"] = "lost-node/00000000-0000-0000-0000-000000000000/pid:[4026531836]"
    if "pid_start" in body:
        body["pid_start"] = "1"
    claim.write_text(json.dumps(body))
    os.utime(claim, (then, then))


def _assert_completed(res, runs: Path, before: dict[str, bytes]) -> None:
    problems = []
    if res.returncode != 0:
        problems.append(f"exit code {res.returncode}, expected 0")
    if len(_fold1_records(runs)) != 1:
        problems.append("fold 1 has no record" + (" although the command exited 0" if res.returncode == 0 else ""))
    problems += [p for p in store_changes(before, runs) if not p.startswith("new record")]
    if "Traceback" in res.stdout + res.stderr:
        problems.append("a traceback was printed")
    assert not problems, "; ".join(problems) + "\n" + res.describe()


# ---- a second driver on the same store ---------------------------------------------------------------------------
# The first driver is paused (SIGSTOP) once it has claimed fold 1: alive, holding the fold, its claim not yet stale.
# So the second driver meets a held fold however fast this machine trains.

def _held_by_paused_driver(started, args: list[object], runs: Path):
    first = started(args)
    wait_for(lambda: _claims(runs), 180, "the first driver to claim fold 1", proc=first)
    os.killpg(first.pid, signal.SIGSTOP)
    if _fold1_records(runs):
        pytest.fail("the first driver finished fold 1 before it could be paused: raise SLOW_EPOCHS")
    return first


def test_a_second_driver_waits_for_the_fold_held_by_the_first(slow_cohort, runs_dir, started, tmp_path):
    before = snapshot(runs_dir)
    args = _slow_args(slow_cohort, runs_dir)
    first = _held_by_paused_driver(started, args, runs_dir)
    t0 = time.time()
    second = started(args, name="second")
    # the second driver starts, plans (README: it writes RUNS/.plans/<id>.json), meets the held fold, must wait
    plans = runs_dir / ".plans"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and second.poll() is None and not any(
            p.stat().st_mtime >= t0 for p in plans.glob("*.json")):
        time.sleep(0.2)
    time.sleep(5)
    problems = []
    if second.poll() is not None:
        problems.append(f"the second driver ended (exit {second.returncode}) while fold 1 was held and had no record")
    os.killpg(first.pid, signal.SIGCONT)
    if first.wait(timeout=600) != 0:
        problems.append(f"setup: the first driver failed (exit {first.returncode})")
    try:
        code = second.wait(timeout=600)
    except Exception:
        pytest.fail("the second driver did not end within 10 minutes of the fold's record")
    stdout, stderr = _output(tmp_path / "second")
    if code != 0:
        problems.append(f"the second driver exited {code}, expected 0 once the fold had its record")
    if len(_fold1_records(runs_dir)) != 1:
        problems.append("fold 1 has no record")
    if "Traceback" in stdout + stderr:
        problems.append("a traceback was printed")
    problems += [p for p in store_changes(before, runs_dir) if not p.startswith("new record")]
    assert not problems, "; ".join(problems) + "\nsecond driver stdout tail:\n" + "\n".join(
        stdout.strip().splitlines()[-10:]) + "\nstderr:\n" + stderr[-2000:]


def test_a_second_driver_with_no_wait_exits_3_naming_the_held_folds(slow_cohort, runs_dir, started):
    args = _slow_args(slow_cohort, runs_dir)
    _held_by_paused_driver(started, args, runs_dir)
    second = run_milbench(*args, "--no-wait", timeout=600)
    problems = []
    if second.returncode != 3:
        problems.append(f"exit code {second.returncode}, expected 3")
    if "Traceback" in second.stdout + second.stderr:
        problems.append("a traceback was printed")
    held = [line for line in (second.stdout + second.stderr).splitlines() if "held" in line.lower() and "1" in line]
    if not held:
        problems.append("no line says how many folds are held elsewhere")
    if _fold1_records(runs_dir):
        problems.append("fold 1 got a record while the first driver held it")
    assert not problems, "; ".join(problems) + "\n" + second.describe()


# ---- claims left behind -----------------------------------------------------------------------------------------

def test_the_claim_of_a_dead_driver_is_taken_over(slow_cohort, runs_dir, started):
    before = snapshot(runs_dir)
    args = _slow_args(slow_cohort, runs_dir)
    _abandoned_claim(started, args, runs_dir)
    res = run_milbench(*args, timeout=600)
    _assert_completed(res, runs_dir, before)
    assert not _claims(runs_dir), "the fold's claim was not released"
    assert not list(runs_dir.rglob(".tmp-*")), "a temporary fold folder was left behind"


def test_the_claim_of_a_lost_node_is_taken_over_once_stale(slow_cohort, runs_dir, started):
    before = snapshot(runs_dir)
    args = _slow_args(slow_cohort, runs_dir)
    claim = _abandoned_claim(started, args, runs_dir)
    _as_other_node(claim, age_s=CLAIM_STALE_S + 60)
    res = run_milbench(*args, timeout=600)
    _assert_completed(res, runs_dir, before)


def test_a_live_claim_of_another_node_is_waited_for_then_taken_over(slow_cohort, runs_dir, started):
    """The other node's heartbeat stops 15 s from now: the driver must wait, then train the fold, then exit 0 (not
    skip it and exit 0 with the fold missing)."""
    before = snapshot(runs_dir)
    args = _slow_args(slow_cohort, runs_dir)
    claim = _abandoned_claim(started, args, runs_dir)
    _as_other_node(claim, age_s=CLAIM_STALE_S - 15)
    res = run_milbench(*args, timeout=600)
    _assert_completed(res, runs_dir, before)


# ---- a missing fold file -----------------------------------------------------------------------------------------

def test_a_missing_fold_file_is_an_error_not_a_smaller_cross_validation(make_cohort, runs_dir):
    cohort = make_cohort()
    cohort.split_file(2).unlink()  # splits_0, 1, 3 remain
    before = snapshot(runs_dir)
    results = [run_milbench(*cohort.run_args(runs_dir), timeout=600),
               run_milbench(*cohort.run_args(runs_dir), "--folds", "2", timeout=600)]
    problems = []
    for res in results:
        label = "--folds 2" if "--folds" in res.args else "all folds"
        if res.returncode != 2:
            problems.append(f"{label}: exit code {res.returncode}, expected 2")
        if not any("splits_2" in line for line in res.stderr_lines):
            problems.append(f"{label}: stderr does not name splits_2")
    problems += store_changes(before, runs_dir)
    assert not problems, "; ".join(problems) + "\n" + "\n".join(r.describe() for r in results)


# ---- Ctrl-C ------------------------------------------------------------------------------------------------------

def test_ctrl_c_exits_130_with_one_line_and_no_partial_record(slow_cohort, runs_dir, started, tmp_path):
    before = snapshot(runs_dir)
    driver = started(_slow_args(slow_cohort, runs_dir), name="interrupted")
    wait_for(lambda: _claims(runs_dir), 180, "the driver to claim fold 1", proc=driver)
    time.sleep(1.0)  # into the fold's training
    if driver.poll() is not None or _fold1_records(runs_dir):
        pytest.fail("fold 1 ended before Ctrl-C could interrupt it: raise SLOW_EPOCHS")
    os.killpg(driver.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole foreground group
    try:
        code = driver.wait(timeout=60)
    except Exception:
        pytest.fail("the driver did not stop within 60 s of Ctrl-C")
    stdout, stderr = _output(tmp_path / "interrupted")
    lines = [line for line in stderr.splitlines() if line.strip()]
    problems = []
    if code != 130:
        problems.append(f"exit code {code}, expected 130")
    if "Traceback" in stdout + stderr:
        problems.append("a traceback was printed")
    if len(lines) != 1:
        problems.append(f"{len(lines)} non-empty stderr lines, expected exactly 1 (what was kept)")
    if _fold1_records(runs_dir):
        problems.append("the interrupted fold has a record")
    if list(runs_dir.rglob(".tmp-*")):
        problems.append("a partial (temporary) fold folder was left behind")
    problems += store_changes(before, runs_dir)
    assert not problems, "; ".join(problems) + "\nstderr:\n" + "\n".join(lines[-15:])
