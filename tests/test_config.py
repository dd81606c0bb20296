import json

import pytest

from samlab.config import PRESETS, RunConfig, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_round_trips_through_json(name):
    cfg = preset(name)
    again = RunConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(again.to_json()) == json.loads(cfg.to_json())


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["optim.rho=-0.1"], "optim.rho"),
        (["optim.method=msam", "optim.m=30"], "optim.m"),
        (["optim.method=msam"], "optim.m"),
        (["optim.method=bogus"], "optim.method"),
        (["data.label_noise=1.0"], "data.label_noise"),
        (["batch_size=0"], "batch_size"),
        (["device=tpu"], "device"),
        (["optim.lr=0"], "optim.lr"),
        (["model.name=diag-linear"], "model.name"),
        (["epochs=2.5"], "epochs"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError) as info:
        preset("digits-cnn", overrides)
    assert str(info.value).startswith(field + ":")


def test_msam_error_lists_the_divisors_of_the_batch():
    with pytest.raises(ValueError, match=r"divisors: \[1, 2, 4, 8, 16, 32, 64, 128\]"):
        preset("digits-cnn", ["optim.method=msam", "optim.m=30"])


def test_unknown_keys_are_refused_not_ignored():
    with pytest.raises(ValueError, match="optim.rhoo: unknown field"):
        RunConfig.from_dict({"optim": {"rhoo": 0.1}})
    with pytest.raises(ValueError, match="nope: unknown field"):
        preset("digits-cnn", ["nope=1"])


def test_overrides_coerce_cli_strings_to_the_annotated_types():
    cfg = preset("digits-cnn", ["optim.rho=0.2", "epochs=3", "data.n_train=none", "optim.nesterov=true"])
    assert cfg.optim.rho == 0.2 and isinstance(cfg.epochs, int) and cfg.epochs == 3
    assert cfg.data.n_train is None and cfg.optim.nesterov is True
    with pytest.raises(ValueError, match="epochs: expected int"):
        RunConfig.from_dict({"epochs": "three"})


def test_label_names_the_distinguishing_hyperparameters():
    cfg = preset("digits-cnn", ["optim.method=msam", "optim.m=8", "optim.rho=0.1", "seed=3"])
    assert cfg.label() == "msam ρ=0.1 m=8 lr=0.05 seed=3"


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset: unknown preset 'x'"):
        preset("x")
