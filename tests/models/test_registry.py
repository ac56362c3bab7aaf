"""The registry: cards read without torch, plug-ins registered as built-ins are, a broken plug-in named and left out."""

from __future__ import annotations

import subprocess
import sys

import pytest

import milbench.models.registry as registry
from milbench import MilbenchError
from milbench.models.cards import BUILTIN, BUILTIN_CARDS


class _EntryPoint:
    def __init__(self, name: str, value: str, load) -> None:
        self.name, self.value, self.load = name, value, load


def test_cards_and_names_need_no_torch():
    code = ("import sys; sys.modules['torch'] = None; from milbench.models.registry import get_card, list_cards; "
            "print(get_card('crossfusion').display_name, len(list_cards(plugins=False)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-400:]
    assert done.stdout.split() == ["CrossFusion", str(len(BUILTIN_CARDS))]


def test_every_builtin_card_names_the_module_that_registers_it():
    for card in BUILTIN_CARDS:
        cls = registry.model_class(card.name)
        assert cls.card is card and cls.__module__ == card.module


def test_a_broken_plugin_is_one_warning_and_the_rest_works(monkeypatch, capsys):
    def broken():
        raise ImportError("No module named 'my_lab_models'\nsecond line")

    class Good:
        def __init__(self, in_dim: int, n_bins: int = 4) -> None:
            self.in_dim = in_dim

    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "entry_points", lambda group: [
        _EntryPoint("brokenmil", "my_lab_models:BrokenMIL", broken),
        _EntryPoint("goodmil", "my_pkg:GoodMIL", lambda: Good)])
    names = [c.name for c in registry.list_cards()]
    err = capsys.readouterr().err.strip().splitlines()
    assert names[: len(BUILTIN)] == list(BUILTIN) and names[len(BUILTIN):] == ["goodmil"]
    assert len(err) == 1 and "brokenmil" in err[0] and "my_lab_models:BrokenMIL" in err[0] and "ImportError" in err[0]
    assert registry.create_model("goodmil", in_dim=5).in_dim == 5
    with pytest.raises(MilbenchError, match="did you mean 'goodmil'"):
        registry.get_card("goodmill")
