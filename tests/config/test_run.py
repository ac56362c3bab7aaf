import pytest

from milbench import MilbenchError
from milbench.config.run import make_config, parse_set


def test_recipe_and_overrides():
    cfg = make_config("amil", "synthetic", "small", {"epochs": 3, "lr": None, "dropout": 0.1})
    assert cfg.epochs == 3 and cfg.lr == 1e-3 and cfg.model_options == {"dropout": 0.1}


def test_hash_changes_with_anything_that_matters():
    a = make_config("amil", "c", "paper")
    assert a.hash == make_config("amil", "c", "paper").hash
    assert a.hash != make_config("amil", "c", "paper", {"seed": 8}).hash
    assert a.hash != make_config("amil", "c", "paper", {"hidden": 256}).hash


def test_bad_values_are_rejected():
    with pytest.raises(MilbenchError, match="protocol"):
        make_config("amil", "c", "paper", {"protocol": "cheat"})
    with pytest.raises(MilbenchError, match="recipe"):
        make_config("amil", "c", "fast")
    with pytest.raises(MilbenchError, match="key=value"):
        parse_set(["lr"])


def test_parse_set_reads_json_values():
    assert parse_set(["lr=0.001", "variant=patchgcn", "flag=true"]) == {"lr": 0.001, "variant": "patchgcn", "flag": True}


def test_the_loss_follows_the_head():
    assert make_config("protosurv", "c", "small", {"head": "cox"}).loss == "cox"
    assert make_config("scmil", "c", "small", {"head": "mdn"}).loss == "mdn"
    assert make_config("amil", "c").loss == "nll" and make_config("amil", "c", "paper", {"loss": "cox"}).loss == "cox"
    assert make_config("protosurv", "c", "small", {"head": "cox", "loss": "cox"}).loss == "cox"
    with pytest.raises(MilbenchError, match="loss=nll cannot train the model's cox head.*--set loss=cox"):
        make_config("protosurv", "c", "small", {"head": "cox", "loss": "nll"})
    with pytest.raises(MilbenchError, match="--set loss=mdn"):
        make_config("scmil", "c", "small", {"head": "mdn", "loss": "cox"})
