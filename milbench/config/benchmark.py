"""Benchmark files: a TOML file names the cohorts, the protocols, the recipe, the seeds and the models; read and
checked here (unknown or missing keys, wrong types and unknown names are refused in one line naming the file).
:mod:`milbench.runs.benchmark` runs it.

Two kinds of file, told apart by their ``[cohorts]`` section:

- **synthetic** (``scenarios = [...]`` with the generator's parameters): the cohorts are written by the generator
  into ``data_dir`` (``benchmarks/synthetic.toml``);
- **TCGA** (``tcga = [...]``, ``backbones = [...]``, optionally ``features``, a template such as
  ``"/data/tcga/{cohort}/{backbone}"``): the shipped tables and fixed folds, features from the user's disk
  (``benchmarks/crossfusion_midl2026.toml``).

Protocols: ``[training] protocol = "fixed"`` (one), or ``protocols = ["best-val", "inner-val"]`` with optional
``[protocols.<name>]`` tables of run fields for that protocol alone (``bins_on``, ``inner_val_fraction``,
``epochs``, ``warmup_epochs``) and a ``label`` the leaderboard prints. ``[unstated]`` maps a name to one line: a
choice the paper leaves open, what was chosen and why (the leaderboard shows these lines).
"""

from __future__ import annotations

import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milbench import MilbenchError

Kind = type | tuple[type, ...]
# section -> key -> (type, required). Keys of the other kind of file are refused by name.
_COMMON: dict[str, dict[str, tuple[Kind, bool]]] = {
    "benchmark": {"name": (str, True), "runs_dir": (str, True)},
    "training": {"protocol": (str, False), "protocols": (list, False), "recipe": (str, True), "epochs": (int, True),
                 "seeds": (list, True)},
    "models": {"names": (list, True)},
}
_SYNTHETIC: dict[str, dict[str, tuple[Kind, bool]]] = {
    "benchmark": {"data_dir": (str, True), "cohort_prefix": (str, True)},
    "cohorts": {"scenarios": (list, True), "patients": (int, True), "censoring": ((int, float), True),
                "size": ((int, float), True), "in_dim": (int, True), "seed": (int, True), "folds": (int, True)},
}
_TCGA: dict[str, dict[str, tuple[Kind, bool]]] = {
    "benchmark": {"paper": (str, False)},
    "cohorts": {"tcga": (list, True), "backbones": (list, True), "features": (str, False)},
}
_TABLES = ("protocols", "options", "unstated")  # free-form tables, checked below
SECTIONS = ("benchmark", "cohorts", "training", "protocols", "models", "options", "unstated")
# Run fields a [protocols.<name>] table may set for that protocol alone.
PROTOCOL_FIELDS = ("bins_on", "inner_val_fraction", "epochs", "warmup_epochs")
PAPER_TABLES = ("table1", "table2")  # milbench.report.published tables a TCGA benchmark may compare against
TEMPLATE_FIELDS = ("cohort", "short", "COHORT", "backbone")  # tcga_blca, blca, BLCA, resnet50


@dataclass(frozen=True)
class CohortParams:
    """What the generator is given for each scenario (milbench.synthetic.generate_cohort)."""

    patients: int
    censoring: float
    size: float
    in_dim: int
    seed: int
    folds: int


@dataclass(frozen=True)
class ProtocolSpec:
    """One protocol of the file: its name, the run fields it sets, and the label the leaderboard prints."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str = ""


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark file, read and checked; relative paths are resolved against the file's repository root.

    ``kind`` is ``synthetic`` (``data_dir``, ``cohort_prefix``, ``scenarios``, ``cohort`` set) or ``tcga``
    (``tcga``, ``backbones``, ``features``, ``paper`` set).
    """

    path: Path
    name: str
    runs_dir: Path
    kind: str
    protocols: tuple[ProtocolSpec, ...]
    recipe: str
    epochs: int
    seeds: tuple[int, ...]
    models: tuple[str, ...]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    unstated: dict[str, str] = field(default_factory=dict)
    data_dir: Path | None = None
    cohort_prefix: str = ""
    scenarios: tuple[str, ...] = ()
    cohort: CohortParams | None = None
    tcga: tuple[str, ...] = ()
    backbones: tuple[str, ...] = ("default",)
    features: str | None = None
    paper: str | None = None

    @property
    def protocol(self) -> str:
        """The first protocol (a synthetic file has one)."""
        return self.protocols[0].name

    def cohort_name(self, scenario: str) -> str:
        """The run store's name of a scenario's cohort (the stem of its table)."""
        return f"{self.cohort_prefix}_{scenario}"

    @property
    def cohorts(self) -> tuple[str, ...]:
        """The run store's cohort names: ``bench_coarse``... or ``tcga_blca``..."""
        return self.tcga if self.kind == "tcga" else tuple(self.cohort_name(s) for s in self.scenarios)


def _root_of(path: Path) -> Path:
    """Paths in a benchmark file are relative to the repository holding it (the parent of ``benchmarks/``)."""
    return path.parent.parent if path.parent.name == "benchmarks" else path.parent


def check_template(template: str, where: str) -> str:
    """A features template may hold only {cohort}, {short}, {COHORT} and {backbone}; anything else is refused."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise MilbenchError(f"{where}: features template '{template}' is malformed ({err}): write e.g. "
                            f"/data/tcga/{{cohort}}/{{backbone}}") from None
    bad = [n for n in names if n not in TEMPLATE_FIELDS]
    if bad:
        raise MilbenchError(f"{where}: features template '{template}' holds {{{bad[0]}}}: use "
                            f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)} (tcga_blca, blca, BLCA, resnet50)")
    return template


def fill_template(template: str, cohort: str, backbone: str) -> str:
    """``/data/{short}/{backbone}`` for cohort ``tcga_blca`` and backbone ``resnet50`` -> ``/data/blca/resnet50``."""
    short = cohort.removeprefix("tcga_")
    return template.format(cohort=cohort, short=short, COHORT=short.upper(), backbone=backbone)


def _sections(raw: dict[str, Any], kind: str) -> dict[str, dict[str, tuple[Kind, bool]]]:
    extra = _SYNTHETIC if kind == "synthetic" else _TCGA
    return {s: {**_COMMON.get(s, {}), **extra.get(s, {})} for s in ("benchmark", "cohorts", "training", "models")}


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MilbenchError(f"benchmark file {path} does not exist: e.g. benchmarks/synthetic.toml or "
                            f"benchmarks/crossfusion_midl2026.toml") from None
    except tomllib.TOMLDecodeError as err:
        raise MilbenchError(f"{path}: not valid TOML ({err})") from None


def _names(values: Any, what: str, bad) -> tuple[str, ...]:
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise bad(f"{what} must be a non-empty list of names")
    if len(set(values)) != len(values):
        raise bad(f"{what} names '{next(v for v in values if values.count(v) > 1)}' twice")
    return tuple(values)


def _protocols(raw: dict[str, Any], training: dict[str, Any], bad) -> tuple[ProtocolSpec, ...]:
    from milbench.config.run import PROTOCOLS, check_value

    if ("protocol" in training) == ("protocols" in training):
        raise bad("[training] needs either 'protocol' (one) or 'protocols' (a list), not both or neither")
    names = [training["protocol"]] if "protocol" in training else list(training["protocols"])
    _names(names, "[training] protocols", bad)
    for name in names:
        if name not in PROTOCOLS:
            raise bad(f"unknown protocol '{name}': use one of {', '.join(PROTOCOLS)}")
    tables = raw.get("protocols", {})
    if not isinstance(tables, dict):
        raise bad("[protocols] must hold one table per protocol, e.g. [protocols.best-val]")
    specs = []
    for name in tables:
        if name not in names:
            raise bad(f"[protocols.{name}] is not a protocol of [training]: use one of {', '.join(names)}")
    for name in names:
        body = dict(tables.get(name, {}))
        if not isinstance(tables.get(name, {}), dict):
            raise bad(f"[protocols.{name}] must be a table")
        label = body.pop("label", "")
        if not isinstance(label, str):
            raise bad(f"[protocols.{name}] label must be a string")
        for key, value in body.items():
            if key not in PROTOCOL_FIELDS:
                raise bad(f"unknown key '{key}' in [protocols.{name}]: use label, {', '.join(PROTOCOL_FIELDS)}")
            try:
                check_value(key, value)
            except MilbenchError as err:
                raise bad(f"[protocols.{name}] {str(err).removeprefix('--set ')}") from None
        if body.get("bins_on", "train") not in ("train", "cohort"):
            raise bad(f"[protocols.{name}] bins_on = '{body['bins_on']}': use train or cohort")
        specs.append(ProtocolSpec(name, body, label))
    return tuple(specs)


def load_spec(path: str | Path) -> BenchmarkSpec:
    """Read and check a benchmark file; any unknown or missing key is a one-line error naming the file."""
    from milbench.config.run import RECIPES
    from milbench.models.registry import get_card
    from milbench.tasks.synthetic import SCENARIOS
    from milbench.tasks.tcga import cohort_name

    path = Path(path)
    raw = _read(path)

    def bad(msg: str) -> MilbenchError:
        return MilbenchError(f"{path}: {msg}")

    for section in raw:
        if section not in SECTIONS:
            raise bad(f"unknown section [{section}]: use {', '.join(f'[{s}]' for s in SECTIONS)}")
    cohorts = raw.get("cohorts")
    if not isinstance(cohorts, dict) or not ({"scenarios", "tcga"} & set(cohorts)):
        raise bad("[cohorts] needs 'scenarios' (generated synthetic cohorts) or 'tcga' (TCGA cohorts with their "
                  "fixed folds)")
    kind = "synthetic" if "scenarios" in cohorts else "tcga"
    values: dict[str, Any] = {}
    for section, keys in _sections(raw, kind).items():
        body = raw.get(section)
        if not isinstance(body, dict):
            raise bad(f"missing section [{section}] (keys {', '.join(keys)})")
        for key in body:
            if key not in keys:
                other = (_TCGA if kind == "synthetic" else _SYNTHETIC).get(section, {})
                why = f" (a key of {'TCGA' if kind == 'synthetic' else 'synthetic'} files)" if key in other else ""
                raise bad(f"unknown key '{key}' in [{section}]{why}: use {', '.join(keys)}")
        for key, (kind_of, required) in keys.items():
            if key not in body:
                if required:
                    raise bad(f"[{section}] needs '{key}'")
                continue
            if not isinstance(body[key], kind_of) or isinstance(body[key], bool):
                raise bad(f"[{section}] {key} = {body[key]!r} has the wrong type")
            values[key] = body[key]
    protocols = _protocols(raw, raw["training"], bad)
    if values["recipe"] not in RECIPES:
        raise bad(f"unknown recipe '{values['recipe']}': use one of {', '.join(RECIPES)}")
    if values["epochs"] < 1:
        raise bad("[training] epochs must be at least 1")
    if not values["seeds"] or not all(isinstance(s, int) and not isinstance(s, bool) for s in values["seeds"]):
        raise bad("[training] seeds must be a non-empty list of integers")
    models = _names(values["names"], "[models] names", bad)
    for name in models:
        try:
            get_card(name)  # an unknown model fails here, with the registry's list of names
        except MilbenchError as err:
            raise bad(str(err)) from None
    options = raw.get("options", {})
    for name, opts in options.items():
        if name not in models or not isinstance(opts, dict):
            raise bad(f"[options.{name}] is not a table of a model in [models] names")
    unstated = raw.get("unstated", {})
    if not isinstance(unstated, dict) or not all(isinstance(v, str) for v in unstated.values()):
        raise bad("[unstated] maps a name to one line of text: what the paper leaves open and what was chosen")
    root = _root_of(path)
    common = dict(path=path, name=values["name"], runs_dir=root / values["runs_dir"], kind=kind, protocols=protocols,
                  recipe=values["recipe"], epochs=values["epochs"], seeds=tuple(values["seeds"]), models=models,
                  options={k: dict(v) for k, v in options.items()}, unstated=dict(unstated))
    if kind == "synthetic":
        unknown = [s for s in values["scenarios"] if s not in SCENARIOS]
        if unknown or not values["scenarios"]:
            raise bad(f"unknown scenario {unknown[0] if unknown else '(none)'}: use {', '.join(SCENARIOS)}")
        if len(protocols) != 1:
            raise bad("a synthetic benchmark runs one protocol: [training] protocol = \"fixed\"")
        return BenchmarkSpec(
            **common, data_dir=root / values["data_dir"], cohort_prefix=values["cohort_prefix"],
            scenarios=tuple(values["scenarios"]),
            cohort=CohortParams(values["patients"], float(values["censoring"]), float(values["size"]),
                                values["in_dim"], values["seed"], values["folds"]))
    try:
        tcga = tuple(cohort_name(c) for c in _names(values["tcga"], "[cohorts] tcga", bad))
    except MilbenchError as err:
        raise bad(str(err)) from None
    backbones = _names(values["backbones"], "[cohorts] backbones", bad)
    slash = next((b for b in backbones if "/" in b or b.startswith(".")), None)
    if slash:
        raise bad(f"backbone '{slash}' is not a folder name: name the backbone folder, e.g. resnet50")
    features = values.get("features")
    if features is not None:
        check_template(features, str(path))
    paper = values.get("paper")
    if paper is not None and paper not in PAPER_TABLES:
        raise bad(f"[benchmark] paper = '{paper}': use one of {', '.join(PAPER_TABLES)}")
    return BenchmarkSpec(**common, tcga=tcga, backbones=backbones, features=features, paper=paper)
