"""Typed run configuration: dataclasses, validation with precise messages, JSON round trip, presets.

Validation raises `ValueError` naming the field (dotted path) and the allowed range, so the CLI, the
run store and the dashboard can all show the same message next to the offending value.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from samlab.validation import check_choice, check_in_range, check_int, check_optional_int

METHODS = ("sgd", "sam", "asam", "usam", "nsam", "msam", "ghostbn", "rwsam")
DATASETS = (
    "digits",
    "gaussian-mixture",
    "teacher-student",
    "sparse-regression",
    "relu-teacher",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
)
MODELS = ("mlp", "cnn", "resnet18", "wrn16", "diag-linear", "relu-net")
BASE_OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "step")
IMPLS = ("auto", "fused", "vmap", "loop")
ESTIMATORS = ("fd", "exact")
NORMS = ("bn", "gn", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
# Methods the SAM optimizer class runs in the engine (gradient accumulation, fp16 with a gradient scaler).
CLASS_PATH_METHODS = ("sam", "asam", "usam")

# Which optimizer fields each method reads; the UI shows only these and the docs list them.
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "sgd": (),
    "sam": ("rho",),
    "asam": ("rho", "adaptive_eta"),
    "usam": ("rho",),
    "nsam": ("rho", "nsam_batch"),
    "msam": ("rho", "m", "impl"),
    "ghostbn": ("rho", "m"),
    "rwsam": ("rho", "lam", "estimator", "delta"),
}


@dataclass
class DataConfig:
    name: str = "digits"
    n_train: int | None = None  # None: the whole train split
    n_test: int | None = None
    label_noise: float = 0.0  # fraction of train labels replaced by a different random class (seeded)
    standardize: bool = True
    augment: bool = False  # random crop + flip for image sets, done in torch
    data_seed: int = 0  # split, subsample and label noise; independent of the training seed
    root: str = "data/datasets"
    # synthetic sets
    n_features: int = 30
    n_classes: int = 10
    sparsity: int = 3  # sparse-regression: non-zeros of w*; relu-teacher: the teacher's hidden units
    noise_std: float = 0.0


@dataclass
class ModelConfig:
    name: str = "cnn"
    width: int = 32  # hidden units (mlp), base channels (cnn, resnet18)
    depth: int = 2  # hidden layers (mlp)
    norm: str = "bn"  # cnn, resnet18, wrn16: BatchNorm, GroupNorm or none
    widen: int = 4  # wrn16: widening factor k
    init_scale: float = 0.1  # diag-linear: initial alpha of u = v = alpha; relu-net: scale of the initial weights


@dataclass
class OptimConfig:
    method: str = "sam"
    rho: float = 0.05
    m: int | None = None  # msam micro-batch size (samples per perturbation)
    impl: str = "auto"
    lam: float = 0.01  # rwsam: p = softmax(lam * s) (0 is SAM); the default is samlab.optim.reweighted.DEFAULT_LAM
    estimator: str = "fd"
    delta: float = 1e-3
    adaptive_eta: float = 0.01  # asam: T = |w| + eta_a
    nsam_batch: int | None = None  # nsam: size of the independent perturbation batch (None: full train set)
    base: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    accumulate: int = 1  # chunks the batch is processed in (SAM over the whole batch, memory of one chunk)


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    warmup_epochs: float = 0.0
    step_every: int = 30  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor
    min_lr: float = 0.0  # cosine floor


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    name: str = ""
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    eval_every: int = 1  # epochs between evaluations
    log_every: int = 1  # steps between per-step metric records
    checkpoint_every: int = 1  # epochs between checkpoints (0: only at the end)
    hessian_every: int = 0  # steps between lambda_max measurements (0: off)
    hessian_samples: int = 256  # size of the fixed subset lambda_max is measured on
    noise_every: int = 0  # steps between tr V measurements (0: off)

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> RunConfig:
        """Raise ValueError naming the first bad field; return self when everything is in range."""
        d, mo, o, s = self.data, self.model, self.optim, self.schedule
        check_choice("data.name", d.name, DATASETS)
        check_optional_int("data.n_train", d.n_train, 1, 10**12)
        check_optional_int("data.n_test", d.n_test, 1, 10**12)
        check_in_range("data.label_noise", d.label_noise, 0.0, 1.0, hi_open=True)
        check_int("data.n_features", d.n_features, 1, 10**12)
        check_int("data.n_classes", d.n_classes, 2, 1000)
        check_int("data.sparsity", d.sparsity, 1, d.n_features)
        check_in_range("data.noise_std", d.noise_std, 0.0, float("inf"))
        check_choice("model.name", mo.name, MODELS)
        check_int("model.width", mo.width, 1, 10**12)
        check_int("model.depth", mo.depth, 1, 64)
        check_choice("model.norm", mo.norm, NORMS)
        check_int("model.widen", mo.widen, 1, 16)
        check_in_range("model.init_scale", mo.init_scale, 0.0, float("inf"), lo_open=True)
        for model_name, data_name in (("diag-linear", "sparse-regression"), ("relu-net", "relu-teacher")):
            if (mo.name == model_name) != (d.name == data_name):
                raise ValueError(
                    f"model.name: {model_name!r} goes with data.name {data_name!r} and only with it "
                    f"(got model {mo.name!r}, data {d.name!r})"
                )
        check_choice("optim.method", o.method, METHODS)
        check_in_range("optim.rho", o.rho, 0.0, float("inf"))
        check_choice("optim.impl", o.impl, IMPLS)
        check_in_range("optim.lam", o.lam, 0.0, float("inf"))
        check_choice("optim.estimator", o.estimator, ESTIMATORS)
        check_in_range("optim.delta", o.delta, 0.0, float("inf"), lo_open=True)
        check_in_range("optim.adaptive_eta", o.adaptive_eta, 0.0, float("inf"))
        check_optional_int("optim.nsam_batch", o.nsam_batch, 1, 10**12)
        check_choice("optim.base", o.base, BASE_OPTIMIZERS)
        check_in_range("optim.lr", o.lr, 0.0, float("inf"), lo_open=True)
        check_in_range("optim.momentum", o.momentum, 0.0, 1.0, hi_open=True)
        check_in_range("optim.weight_decay", o.weight_decay, 0.0, float("inf"))
        if o.nesterov and (o.base != "sgd" or o.momentum <= 0):
            raise ValueError("optim.nesterov: needs optim.base 'sgd' and optim.momentum > 0")
        check_choice("schedule.name", s.name, SCHEDULES)
        check_in_range("schedule.warmup_epochs", s.warmup_epochs, 0.0, float("inf"))
        check_int("schedule.step_every", s.step_every, 1, 10**12)
        check_in_range("schedule.gamma", s.gamma, 0.0, 1.0, lo_open=True)
        check_in_range("schedule.min_lr", s.min_lr, 0.0, o.lr)
        check_int("epochs", self.epochs, 1, 100_000)
        check_int("batch_size", self.batch_size, 1, 1_000_000)
        if o.method in ("msam", "ghostbn"):
            if o.m is None:
                raise ValueError(f"optim.m: {o.method} needs the micro-batch size m (samples per perturbation "
                                 "or per BatchNorm statistics)")
            check_int("optim.m", o.m, 1, self.batch_size)
            if self.batch_size % o.m != 0:
                raise ValueError(
                    f"optim.m: must divide batch_size={self.batch_size} (got m={o.m}); "
                    f"divisors: {_divisors(self.batch_size)}"
                )
        elif o.m is not None:
            check_int("optim.m", o.m, 1, self.batch_size)
        self._validate_class_path()
        check_int("seed", self.seed, 0, 2**31 - 1)
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")
        ):
            raise ValueError(f"device: must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' (got {self.device!r})")
        check_choice("precision", self.precision, PRECISIONS)
        check_int("eval_every", self.eval_every, 1, 100_000)
        check_int("log_every", self.log_every, 1, 1_000_000)
        check_int("checkpoint_every", self.checkpoint_every, 0, 100_000)
        check_int("hessian_every", self.hessian_every, 0, 10_000_000)
        check_int("hessian_samples", self.hessian_samples, 1, 10**12)
        check_int("noise_every", self.noise_every, 0, 10_000_000)
        return self

    def _validate_class_path(self) -> None:
        """optim.accumulate and precision fp16 run the step through the SAM optimizer class."""
        o = self.optim
        check_int("optim.accumulate", o.accumulate, 1, self.batch_size)
        if self.batch_size % o.accumulate:
            raise ValueError(f"optim.accumulate: must divide batch_size={self.batch_size} into equal chunks "
                             f"(got {o.accumulate}); divisors: {_divisors(self.batch_size)}")
        for name, used in (("optim.accumulate", o.accumulate > 1), ("precision", self.precision == "fp16")):
            if used and o.method not in CLASS_PATH_METHODS:
                value = f"accumulate={o.accumulate}" if name == "optim.accumulate" else "fp16"
                raise ValueError(f"{name}: {value} runs through the SAM optimizer class, which the engine uses for "
                                 f"methods {', '.join(CLASS_PATH_METHODS)} (got optim.method {o.method!r}; "
                                 "msam with impl='loop' already holds one micro-batch at a time)")

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build from a (possibly partial) nested dict; unknown keys are an error, not ignored."""
        return _build(cls, raw, "")

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> RunConfig:
        """A copy with dotted-key overrides, e.g. {"optim.rho": 0.1} or ["optim.rho=0.1"]."""
        if isinstance(overrides, list):
            overrides = dict(parse_assignment(item) for item in overrides)
        raw = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return RunConfig.from_dict(raw)

    def label(self) -> str:
        """Short human label from the distinguishing hyperparameters."""
        o = self.optim
        parts = [o.method]
        if o.method != "sgd":
            parts.append(f"ρ={o.rho:g}")
        if o.method in ("msam", "ghostbn"):
            parts.append(f"m={o.m}")
        if o.method == "rwsam":
            parts.append(f"λ={o.lam:g}")
        parts.append(f"lr={o.lr:g}")
        parts.append(f"seed={self.seed}")
        return " ".join(parts)


# -- presets ----------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    "digits-cnn": {
        "name": "digits-cnn",
        "data": {"name": "digits", "n_train": None, "label_noise": 0.0},
        "model": {"name": "cnn", "width": 16},
        "optim": {"method": "sam", "rho": 0.05, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine"},
        "epochs": 10,
        "batch_size": 128,
    },
    "digits-mlp": {
        "name": "digits-mlp",
        "data": {"name": "digits"},
        "model": {"name": "mlp", "width": 64, "depth": 2},
        "optim": {"method": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "epochs": 30,
        "batch_size": 64,
    },
    "digits-msharp": {
        # An MLP variant of the m-sharpness sweep: 512 digits with 20 % label noise, one hidden layer,
        # small enough for a 5-seed m × ρ sweep on a 2-core CPU (see samlab.sweeps).
        "name": "digits-msharp",
        "data": {"name": "digits", "n_train": 512, "label_noise": 0.2},
        "model": {"name": "mlp", "width": 128, "depth": 1},
        "optim": {"method": "sam", "rho": 0.1, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine"},
        "epochs": 30,
        "batch_size": 64,
        "device": "cpu",
        "checkpoint_every": 0,
    },
    "digits-cnn-msharp": {
        # The lesson's m-sharpness sweep: the small BatchNorm CNN on 512 digits with 20 % label noise.
        # m-SAM runs each micro-batch (ascent and descent) with its own BatchNorm statistics, as
        # data-parallel SAM does per device. The lesson's 105-run sweep over m × ρ × 5 seeds fits in
        # minutes on a 2-core CPU with sweep workers.
        "name": "digits-cnn-msharp",
        "data": {"name": "digits", "n_train": 512, "label_noise": 0.2},
        "model": {"name": "cnn", "width": 16},
        "optim": {"method": "sam", "rho": 0.28, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine"},
        "epochs": 30,
        "batch_size": 64,
        "device": "cpu",
        "checkpoint_every": 0,
    },
    "relu-msharp": {
        # m-sharpness on a neural network in seconds per run: a two-layer ReLU student (width 40, small
        # init) fitted full-batch to 60 noisy samples of a 2-unit ReLU teacher in 10 dimensions. Found by
        # benchmarks/msharp_search.py: with ρ chosen per m on seeds 0-3, m-SAM at m = 20 and m = 6 beats SAM
        # (m = 60, the batch, which is also n-SAM here) on held-out seeds (README, "m-sharpness search").
        "name": "relu-msharp",
        "data": {"name": "relu-teacher", "n_train": 60, "n_test": 2000, "n_features": 10, "sparsity": 2,
                 "noise_std": 0.3},
        "model": {"name": "relu-net", "width": 40, "init_scale": 0.01},
        "optim": {"method": "sam", "rho": 0.03, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "epochs": 2000,
        "batch_size": 60,
        "device": "cpu",
        "checkpoint_every": 0,
        "eval_every": 100,
        "log_every": 20,
    },
    "diag-sparse": {
        # Andriushchenko & Flammarion 2022: n=20, d=30, 3-sparse target, Gaussian inputs, unnormalized SAM.
        "name": "diag-sparse",
        "data": {"name": "sparse-regression", "n_train": 20, "n_test": 1000, "n_features": 30, "sparsity": 3,
                 "standardize": False},
        "model": {"name": "diag-linear", "init_scale": 0.1},
        "optim": {"method": "usam", "rho": 0.1, "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "epochs": 2000,
        "batch_size": 20,
        "checkpoint_every": 0,
        "log_every": 20,
    },
    "cifar10-resnet18": {
        "name": "cifar10-resnet18",
        "data": {"name": "cifar10", "augment": True},
        "model": {"name": "resnet18", "width": 64, "norm": "bn"},
        "optim": {"method": "sam", "rho": 0.05, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "epochs": 200,
        "batch_size": 128,
        "precision": "bf16",
        "log_every": 10,
    },
}


def preset(name: str, overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """A validated preset, optionally with dotted-key overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = RunConfig.from_dict(copy.deepcopy(PRESETS[name]))
    if overrides:
        cfg = cfg.with_overrides(overrides)
    return cfg.validate()


# -- helpers ------------------------------------------------------------------------------------
def _build(cls, raw: dict[str, Any], prefix: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ValueError(f"{prefix}{key}: unknown field; known fields: {sorted(fields)}")
        f = fields[key]
        sub = _dataclass_type(f)
        if sub is not None:
            kwargs[key] = _build(sub, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, f.type)
    return cls(**kwargs)


def _dataclass_type(f):
    return {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "schedule": ScheduleConfig}.get(
        f.name
    ) if f.type in ("DataConfig", "ModelConfig", "OptimConfig", "ScheduleConfig") else None


def _coerce(name: str, value: Any, type_name: str) -> Any:
    """Coerce JSON / CLI values to the annotated scalar type, with a precise error."""
    optional = "None" in type_name
    base = type_name.replace("| None", "").strip()
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ValueError(f"{name}: may not be empty")
    try:
        if base == "bool":
            if isinstance(value, str):
                low = value.lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if base == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {base}{' or None' if optional else ''}, got {value!r}") from None
    return value


def parse_assignment(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected key=value, e.g. optim.rho=0.1")
    key, _, text = item.partition("=")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], dict):
            raise ValueError(f"{key}: unknown field")
        node = node[part]
    if parts[-1] not in node:
        raise ValueError(f"{key}: unknown field")
    node[parts[-1]] = value


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]
