"""Config ↔ form values: every preset round-trips, only used fields are shown and used, errors find
their field, seeds parse."""

from __future__ import annotations

import dataclasses

import pytest

from dashboard import forms
from samlab.config import METHOD_FIELDS, PRESETS, OptimConfig, RunConfig, preset


def _leaf_keys(cls, prefix=""):
    keys = []
    for f in dataclasses.fields(cls):
        sub = {"data", "model", "optim", "schedule"}
        if f.name in sub and prefix == "":
            keys.extend(_leaf_keys(type(getattr(RunConfig(), f.name)), f"{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def test_every_hyperparameter_has_a_widget():
    assert set(forms.FIELDS_BY_KEY) | {"seed"} == set(_leaf_keys(RunConfig))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_the_form(name):
    cfg = preset(name, {"seed": 7})
    assert forms.config_from_values(forms.config_values(cfg), seed=7) == cfg


@pytest.mark.parametrize("method", sorted(METHOD_FIELDS))
def test_only_the_method_fields_are_shown(method):
    method_universe = {k for names in METHOD_FIELDS.values() for k in names}
    shown = {f.key.split(".", 1)[1] for f in forms.visible_fields({"optim.method": method})
             if f.key.startswith("optim.")}
    assert shown & method_universe == set(METHOD_FIELDS[method])


def test_hidden_fields_take_their_defaults():
    values = forms.config_values(preset("digits-mlp", {"optim.method": "msam", "optim.m": 8}))
    values["optim.method"] = "sam"
    values["schedule.gamma"] = 5.0  # invalid, but the constant schedule does not use it
    cfg = forms.config_from_values(values)
    assert cfg.optim.m is None and cfg.schedule.gamma == RunConfig().schedule.gamma
    assert cfg.optim.lam == OptimConfig().lam


def test_visible_fields_follow_model_schedule_base_and_dataset():
    keys = {f.key for f in forms.visible_fields({"model.name": "mlp", "schedule.name": "step",
                                                 "optim.base": "adamw", "data.name": "sparse-regression"})}
    assert {"model.depth", "schedule.step_every", "schedule.gamma", "data.sparsity"} <= keys
    assert not keys & {"model.norm", "schedule.min_lr", "optim.momentum", "optim.nesterov", "data.augment",
                       "data.label_noise", "data.n_classes"}


def test_validation_errors_name_their_field():
    values = forms.config_values(preset("digits-mlp", {"optim.method": "msam", "optim.m": 8}))
    values["optim.m"] = 5
    configs, errors = forms.check_values(values, "0")
    assert configs == [] and list(errors) == ["optim.m"] and "must divide batch_size=64" in errors["optim.m"]
    values["optim.m"], values["optim.rho"] = 8, -0.1
    assert list(forms.check_values(values, "0")[1]) == ["optim.rho"]
    values["optim.rho"] = 0.1
    assert list(forms.check_values(values, "0, x")[1]) == ["seeds"]
    configs, errors = forms.check_values(values, "0-2")
    assert errors == {} and [c.seed for c in configs] == [0, 1, 2]
    assert forms.error_field("seed: must be an integer") == "seeds"
    assert forms.error_field("something else went wrong") is None


def test_parse_seeds():
    assert forms.parse_seeds("3") == [3]
    assert forms.parse_seeds("0, 1, 1; 2") == [0, 1, 2]
    assert forms.parse_seeds("4-6, 9") == [4, 5, 6, 9]
    for bad in ("", "a", "5-2", "-1", f"0-{forms.MAX_SEEDS}"):
        with pytest.raises(ValueError, match="^seeds:"):
            forms.parse_seeds(bad)


def test_state_round_trip():
    cfg = preset("digits-cnn", {"optim.method": "rwsam", "optim.lam": 2.0})
    state: dict = {}
    forms.load_config_into_state(cfg, state, "p", seeds=[1, 2])
    assert state["p.seeds"] == "1, 2" and isinstance(state["p.optim.rho"], float)
    assert forms.config_from_values(forms.values_from_state(state, "p"), seed=cfg.seed) == cfg
