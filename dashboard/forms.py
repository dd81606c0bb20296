"""RunConfig ↔ widgets: one field spec per hyperparameter, shown only where it is used.

The pure part (field specs, which fields a config uses, state → RunConfig, error → field) has no
streamlit and is unit-tested; `render_config_form` draws the widgets. Widgets live in
`st.session_state` under `<prefix>.<dotted field>` keys, so a preset fills the form by writing
those keys before the widgets are drawn (`load_config_into_state`).

Validation is `RunConfig.validate()`, whose messages start with the dotted field name
("optim.m: must divide batch_size=..."); `error_field` maps such a message back to the widget
that shows it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from samlab.config import (
    BASE_OPTIMIZERS,
    DATASETS,
    ESTIMATORS,
    IMPLS,
    METHOD_FIELDS,
    METHODS,
    MODELS,
    NORMS,
    PRECISIONS,
    SCHEDULES,
    RunConfig,
)
from samlab.data import DATASET_INFO

SEEDS_FIELD = "seeds"
MAX_SEEDS = 64

# Fields a model / dataset / schedule / base optimizer reads beyond the common ones (like METHOD_FIELDS).
MODEL_FIELDS: dict[str, tuple[str, ...]] = {
    "mlp": ("width", "depth"),
    "cnn": ("width", "norm"),
    "resnet18": ("width", "norm"),
    "wrn16": ("widen", "norm"),
    "diag-linear": ("init_scale",),
    "relu-net": ("width", "init_scale"),
}
SYNTHETIC_DATA_FIELDS: dict[str, tuple[str, ...]] = {
    "gaussian-mixture": ("n_features", "n_classes"),
    "teacher-student": ("n_features", "n_classes"),
    "sparse-regression": ("n_features", "sparsity", "noise_std"),
    "relu-teacher": ("n_features", "sparsity", "noise_std"),
}
SCHEDULE_FIELDS: dict[str, tuple[str, ...]] = {
    "constant": ("warmup_epochs",),
    "cosine": ("warmup_epochs", "min_lr"),
    "step": ("warmup_epochs", "step_every", "gamma"),
}
BASE_FIELDS: dict[str, tuple[str, ...]] = {"sgd": ("momentum", "nesterov"), "adamw": ()}


@dataclass(frozen=True)
class FieldSpec:
    """One widget: the dotted RunConfig field, its label, kind and choices."""

    key: str  # dotted path in RunConfig, e.g. "optim.rho"
    label: str
    kind: str  # "select" | "int" | "float" | "optional_int" | "bool" | "text"
    options: tuple[str, ...] = ()
    help: str = ""
    step: float | None = None
    section: str = ""


def _spec(section: str, key: str, label: str, kind: str, **kw: Any) -> FieldSpec:
    return FieldSpec(key=key, label=label, kind=kind, section=section, **kw)


FIELDS: tuple[FieldSpec, ...] = (
    # data
    _spec("data", "data.name", "dataset", "select", options=DATASETS,
          help="digits and the synthetic sets are built in. mnist, fashion-mnist, cifar10 and cifar100 are read "
               "from the dataset folder (default data/datasets/): put MNIST/raw/, FashionMNIST/raw/, "
               "cifar-10-batches-py/ or cifar-100-python/ there first; samlab never downloads"),
    _spec("data", "data.n_train", "train samples", "optional_int", help="empty: the whole train split"),
    _spec("data", "data.n_test", "test samples", "optional_int", help="empty: the whole test split"),
    _spec("data", "data.label_noise", "label noise (fraction)", "float", step=0.05,
          help="fraction of train labels replaced by a different random class, in [0, 1)"),
    _spec("data", "data.data_seed", "data seed", "int", help="split, subsample and label noise"),
    _spec("data", "data.standardize", "standardize inputs", "bool"),
    _spec("data", "data.augment", "augment (crop + flip)", "bool", help="image sets only"),
    _spec("data", "data.n_features", "features d", "int"),
    _spec("data", "data.n_classes", "classes", "int"),
    _spec("data", "data.sparsity", "sparsity (non-zeros of the target; relu-teacher: teacher units)", "int"),
    _spec("data", "data.noise_std", "target noise std", "float", step=0.01),
    _spec("data", "data.root", "dataset folder", "text"),
    # model
    _spec("model", "model.name", "model", "select", options=MODELS),
    _spec("model", "model.width", "width (hidden units / base channels)", "int"),
    _spec("model", "model.depth", "hidden layers", "int"),
    _spec("model", "model.norm", "normalization", "select", options=NORMS, help="bn: BatchNorm, gn: GroupNorm"),
    _spec("model", "model.widen", "widening factor k", "int"),
    _spec("model", "model.init_scale", "initial scale (diag-linear: u = v = α; relu-net: weight scale)", "float",
          step=0.01),
    # optimizer
    _spec("optim", "optim.method", "method", "select", options=METHODS,
          help="sgd, SAM, adaptive SAM, unnormalized SAM, n-SAM, micro-batch mSAM, reweighted RW-SAM"),
    _spec("optim", "optim.rho", "radius ρ", "float", step=0.01),
    _spec("optim", "optim.m", "micro-batch size m (samples per perturbation)", "optional_int",
          help="must divide the batch size; m = batch size is plain SAM"),
    _spec("optim", "optim.impl", "mSAM implementation", "select", options=IMPLS,
          help="auto: fused on the built-in models, else vmap, else loop; fused: all micro-batches in one pass "
               "of the model with per-micro-batch weights; vmap: all at once with torch.func; loop: one after another"),
    _spec("optim", "optim.lam", "RW-SAM temperature λ", "float", step=0.1, help="λ = 0 is SAM"),
    _spec("optim", "optim.estimator", "RW-SAM gradient-norm estimator", "select", options=ESTIMATORS,
          help="fd: one extra forward pass with a Rademacher probe; exact: per-sample gradients"),
    _spec("optim", "optim.delta", "finite-difference step δ", "float", step=1e-4),
    _spec("optim", "optim.adaptive_eta", "ASAM η_a (T = |w| + η_a)", "float", step=0.01),
    _spec("optim", "optim.nsam_batch", "n-SAM perturbation batch", "optional_int",
          help="empty: the full train set"),
    _spec("optim", "optim.accumulate", "gradient accumulation (chunks per batch)", "int",
          help="sam, asam, usam: SAM over the whole batch, computed one chunk at a time; must divide the batch size"),
    _spec("optim", "optim.base", "base optimizer", "select", options=BASE_OPTIMIZERS),
    _spec("optim", "optim.lr", "learning rate", "float", step=0.01),
    _spec("optim", "optim.momentum", "momentum", "float", step=0.05),
    _spec("optim", "optim.nesterov", "Nesterov", "bool"),
    _spec("optim", "optim.weight_decay", "weight decay", "float", step=1e-4),
    # schedule
    _spec("schedule", "schedule.name", "schedule", "select", options=SCHEDULES),
    _spec("schedule", "schedule.warmup_epochs", "warm-up (epochs)", "float", step=0.5),
    _spec("schedule", "schedule.min_lr", "cosine floor (lr)", "float", step=1e-3),
    _spec("schedule", "schedule.step_every", "decay every (epochs)", "int"),
    _spec("schedule", "schedule.gamma", "decay factor γ", "float", step=0.05),
    # run
    _spec("run", "name", "run name", "text", help="empty: named after its hyperparameters"),
    _spec("run", "epochs", "epochs", "int"),
    _spec("run", "batch_size", "batch size", "int"),
    _spec("run", "device", "device", "select", options=("auto", "cpu")),
    _spec("run", "precision", "precision", "select", options=PRECISIONS,
          help="bf16 autocast, or fp16 autocast with a gradient scaler (sam, asam, usam)"),
    _spec("run", "eval_every", "evaluate every (epochs)", "int"),
    _spec("run", "log_every", "log step metrics every (steps)", "int"),
    _spec("run", "checkpoint_every", "checkpoint every (epochs, 0: only at the end)", "int"),
    _spec("run", "hessian_every", "λ_max every (steps, 0: off)", "int"),
    _spec("run", "hessian_samples", "λ_max / tr V subset size", "int"),
    _spec("run", "noise_every", "tr V every (steps, 0: off)", "int"),
)
FIELDS_BY_KEY: dict[str, FieldSpec] = {f.key: f for f in FIELDS}
SECTIONS: tuple[tuple[str, str], ...] = (
    ("data", "Data"),
    ("model", "Model"),
    ("optim", "Optimizer"),
    ("schedule", "Schedule"),
    ("run", "Run"),
)


# -- pure: which fields a config uses ---------------------------------------------------------------
def visible_fields(choices: Mapping[str, Any]) -> list[FieldSpec]:
    """The fields to show given the current choices of dataset, model, method, schedule and base.

    `choices` maps dotted keys to the current values of the selectors ("data.name", "model.name",
    "optim.method", "schedule.name", "optim.base"); missing ones take the RunConfig defaults.
    """
    default = _default_values()
    pick = {k: choices.get(k, default[k]) for k in
            ("data.name", "model.name", "optim.method", "schedule.name", "optim.base")}
    return [f for f in FIELDS if _is_used(f.key, pick)]


def _is_used(key: str, pick: Mapping[str, Any]) -> bool:
    section, _, name = key.partition(".")
    if section == "data" and name in ("n_features", "n_classes", "sparsity", "noise_std"):
        return name in SYNTHETIC_DATA_FIELDS.get(pick["data.name"], ())
    info = DATASET_INFO.get(pick["data.name"], {})
    if key == "data.augment":
        return bool(info.get("image"))
    if key == "data.label_noise":
        return info.get("task") == "classification"
    if section == "model" and name != "name":
        return name in MODEL_FIELDS.get(pick["model.name"], ())
    if section == "optim" and name in _ALL_METHOD_FIELDS:
        return name in METHOD_FIELDS.get(pick["optim.method"], ())
    if section == "optim" and name in _ALL_BASE_FIELDS:
        return name in BASE_FIELDS.get(pick["optim.base"], ())
    if section == "schedule" and name != "name":
        return name in SCHEDULE_FIELDS.get(pick["schedule.name"], ())
    return True


_ALL_METHOD_FIELDS = {name for names in METHOD_FIELDS.values() for name in names}
_ALL_BASE_FIELDS = {name for names in BASE_FIELDS.values() for name in names}


# -- pure: values ↔ RunConfig --------------------------------------------------------------------
def config_values(cfg: RunConfig) -> dict[str, Any]:
    """Flat {dotted key: value} of every form field of `cfg`."""
    flat = _flatten(cfg.to_dict())
    return {f.key: flat[f.key] for f in FIELDS}


def config_from_values(values: Mapping[str, Any], *, seed: int = 0) -> RunConfig:
    """Build and validate a RunConfig from form values; fields the choices do not use take defaults.

    Hidden fields fall back to the RunConfig defaults, so a value typed for one method (say m for
    mSAM) never leaks into a run of another. Raises ValueError naming the field.
    """
    shown = {f.key for f in visible_fields(values)}
    raw = _nested(_default_values())
    for key in shown:
        if key in values:
            _set(raw, key, _normalise(FIELDS_BY_KEY[key], values[key]))
    raw["seed"] = seed
    return RunConfig.from_dict(raw).validate()


def parse_seeds(text: str) -> list[int]:
    """'0' → [0]; '0, 1, 2' → [0, 1, 2]; '0-4' → [0, 1, 2, 3, 4]; duplicates removed, order kept."""
    seeds: list[int] = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            if match:
                lo, hi = int(match.group(1)), int(match.group(2))
                if hi < lo:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            elif re.fullmatch(r"\d+", part):
                seeds.append(int(part))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"seeds: expected non-negative integers separated by commas or a range like 0-4 (got {part!r})"
            ) from None
    seeds = list(dict.fromkeys(seeds))
    if not seeds:
        raise ValueError("seeds: give at least one seed, e.g. 0 or 0, 1, 2 or 0-4")
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"seeds: at most {MAX_SEEDS} seeds at once (got {len(seeds)})")
    bad = [s for s in seeds if s > 2**31 - 1]
    if bad:
        raise ValueError(f"seeds: must be in [0, {2**31 - 1}] (got {bad[0]})")
    return seeds


def format_seeds(seeds: Sequence[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def configs_from_values(values: Mapping[str, Any], seeds_text: str) -> list[RunConfig]:
    """One validated RunConfig per seed (several seeds → several runs of one group)."""
    return [config_from_values(values, seed=s) for s in parse_seeds(seeds_text)]


def error_field(message: str) -> str | None:
    """The dotted field a validation message names ('optim.m: must divide ...' → 'optim.m')."""
    match = re.match(r"^\s*([A-Za-z_][\w.]*)\s*[:=]", message)
    if not match:
        return None
    key = match.group(1)
    if key == "seed":
        return SEEDS_FIELD
    return key if key in FIELDS_BY_KEY or key == SEEDS_FIELD else None


def check_values(values: Mapping[str, Any], seeds_text: str) -> tuple[list[RunConfig], dict[str, str]]:
    """Configs when everything is valid, else the errors keyed by field ('' for errors of no field)."""
    try:
        return configs_from_values(values, seeds_text), {}
    except ValueError as err:
        message = str(err)
        return [], {error_field(message) or "": message}


def field_notes(values: Mapping[str, Any]) -> dict[str, str]:
    """Notes (not errors) for the field they concern: what the engine does with a valid but unusual choice."""
    notes: dict[str, str] = {}
    batch = values.get("batch_size")
    n = values.get("data.n_train") or DATASET_INFO.get(values.get("data.name"), {}).get("n_train")
    if isinstance(batch, int) and isinstance(n, int) and 0 < n < batch:
        # the engine caps the batch at the train-set size (samlab.train: batch = min(batch_size, n))
        note = (f"{n} train samples < batch size {batch}: the batch is clipped to {n}, so each epoch is one "
                f"full-batch step on all {n} samples.")
        if values.get("optim.method") == "msam":
            note += f" m must divide {n}."
        notes["data.n_train"] = note
    return notes


# -- session state ----------------------------------------------------------------------------------
def state_key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}"


def load_config_into_state(cfg: RunConfig, state: MutableMapping[str, Any], prefix: str,
                           seeds: Sequence[int] | None = None) -> None:
    """Write a config's values into the widget keys, so the next draw of the form shows them."""
    backup = state.setdefault(_backup_key(prefix), {})
    for key, value in config_values(cfg).items():
        state[state_key(prefix, key)] = backup[key] = _widget_value(FIELDS_BY_KEY[key], value)
    state[state_key(prefix, SEEDS_FIELD)] = format_seeds(seeds if seeds is not None else [cfg.seed])


def _backup_key(prefix: str) -> str:
    # Streamlit forgets the state of a widget that was not drawn in a run; this copy (not a widget
    # key) brings a hidden field back with its last value when it is shown again.
    return f"{prefix}._values"


def values_from_state(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {f.key: state[state_key(prefix, f.key)] for f in FIELDS if state_key(prefix, f.key) in state}


# -- streamlit rendering ---------------------------------------------------------------------------------
def render_config_form(prefix: str, *, device_options: Sequence[str] = ("auto", "cpu"),
                       columns: int = 3) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Draw the widgets of every used field, grouped by section.

    Returns (values, seeds_text, slots): the current values, the seeds text, and one empty
    placeholder per field (and for "seeds") where the caller writes that field's error.
    """
    import streamlit as st

    slots: dict[str, Any] = {}
    backup = st.session_state.setdefault(_backup_key(prefix), {})
    defaults = _default_values()
    for section, title in SECTIONS:
        st.markdown(f"**{title}**")
        current = values_from_state(st.session_state, prefix)
        specs = [f for f in visible_fields(current) if f.section == section]
        cols = st.columns(columns)
        for index, spec in enumerate(specs):
            key = state_key(prefix, spec.key)
            if key not in st.session_state:
                st.session_state[key] = _widget_value(spec, backup.get(spec.key, defaults[spec.key]))
            with cols[index % columns]:
                _draw_widget(spec, prefix, device_options)
                slots[spec.key] = st.empty()
            backup[spec.key] = st.session_state[key]
        if section == "run":
            with cols[len(specs) % columns]:
                st.text_input("seeds", key=state_key(prefix, SEEDS_FIELD),
                              help="one run per seed, launched as one group: '0', '0, 1, 2' or '0-4'")
                slots[SEEDS_FIELD] = st.empty()
    values = values_from_state(st.session_state, prefix)
    return values, str(st.session_state.get(state_key(prefix, SEEDS_FIELD), "0")), slots


def _draw_widget(spec: FieldSpec, prefix: str, device_options: Sequence[str]) -> None:
    import streamlit as st

    key = state_key(prefix, spec.key)
    help_text = spec.help or None
    if spec.kind == "select":
        options = list(device_options) if spec.key == "device" else list(spec.options)
        if key in st.session_state and st.session_state[key] not in options:
            options.append(st.session_state[key])
        st.selectbox(spec.label, options, key=key, help=help_text)
    elif spec.kind == "bool":
        st.checkbox(spec.label, key=key, help=help_text)
    elif spec.kind == "int":
        st.number_input(spec.label, step=1, key=key, help=help_text)
    elif spec.kind == "optional_int":
        st.number_input(spec.label, step=1, key=key, help=help_text, placeholder="empty: not set")
    elif spec.kind == "float":
        st.number_input(spec.label, step=spec.step or 0.01, format="%g", key=key, help=help_text)
    else:
        st.text_input(spec.label, key=key, help=help_text)


# -- helpers ------------------------------------------------------------------------------------------
def _default_values() -> dict[str, Any]:
    return config_values(RunConfig())


def _widget_value(spec: FieldSpec, value: Any) -> Any:
    if spec.kind == "float" and value is not None:
        return float(value)
    return value


def _normalise(spec: FieldSpec, value: Any) -> Any:
    """Widget value → config value: whole floats from number inputs become ints for int fields."""
    if spec.kind in ("int", "optional_int") and isinstance(value, float) and value.is_integer():
        return int(value)
    if spec.kind == "text" and value is None:
        return ""
    return value


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    raw = _flatten_defaults()
    for key, value in flat.items():
        _set(raw, key, value)
    return raw


def _flatten_defaults() -> dict[str, Any]:
    return dataclasses.asdict(RunConfig())


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
