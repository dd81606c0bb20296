"""Dataset registry: offline digits and synthetic sets, MNIST / Fashion-MNIST / CIFAR from disk or torchvision.

Every dataset is loaded whole into tensors (small enough for these studies) and can live on the
training device, so batching and augmentation never leave it. Randomness (split, subsample, label
noise, synthetic draws) is driven by `DataConfig.data_seed` through independent named streams, so
changing one option does not reshuffle what another option drew.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from samlab.config import DATASETS, DataConfig

# -- metadata for the UI -------------------------------------------------------------------------
DATASET_INFO: dict[str, dict[str, Any]] = {
    "digits": {
        "description": "scikit-learn handwritten digits, 8×8 grey images, 10 classes (bundled, offline)",
        "task": "classification",
        "input_shape": (1, 8, 8),
        "num_classes": 10,
        "n_train": 1437,
        "n_test": 360,
        "offline": True,
        "image": True,
        "augment": {"pad": 1, "flip": False},
    },
    "gaussian-mixture": {
        "description": "synthetic: n_classes Gaussian clusters in n_features dimensions (unit-variance noise)",
        "task": "classification",
        "input_shape": None,  # (n_features,)
        "num_classes": None,  # n_classes
        "n_train": 1000,
        "n_test": 1000,
        "offline": True,
        "image": False,
    },
    "teacher-student": {
        "description": "synthetic: Gaussian inputs labelled by the argmax of a random one-hidden-layer ReLU teacher",
        "task": "classification",
        "input_shape": None,
        "num_classes": None,
        "n_train": 1000,
        "n_test": 1000,
        "offline": True,
        "image": False,
    },
    "sparse-regression": {
        "description": (
            "synthetic sparse regression (Andriushchenko & Flammarion 2022): x ~ N(0, I_d), "
            "y = <w*, x> with a `sparsity`-sparse unit-norm w*; for the diagonal linear network"
        ),
        "task": "regression",
        "input_shape": None,
        "num_classes": None,
        "n_train": 20,
        "n_test": 1000,
        "offline": True,
        "image": False,
    },
    "relu-teacher": {
        "description": (
            "synthetic regression: x ~ N(0, I_d), y = Σ_k relu(<w*_k, x>) for a ReLU teacher of `sparsity` "
            "unit-norm hidden units (plus noise_std Gaussian noise on the train targets); for relu-net"
        ),
        "task": "regression",
        "input_shape": None,
        "num_classes": None,
        "n_train": 60,
        "n_test": 2000,
        "offline": True,
        "image": False,
    },
    "mnist": {
        "description": "MNIST handwritten digits, 28×28 grey, 10 classes (files under <root>/MNIST/raw)",
        "task": "classification",
        "input_shape": (1, 28, 28),
        "num_classes": 10,
        "n_train": 60000,
        "n_test": 10000,
        "offline": False,
        "image": True,
        "augment": {"pad": 2, "flip": False},
    },
    "fashion-mnist": {
        "description": "Fashion-MNIST clothing images, 28×28 grey, 10 classes (files under <root>/FashionMNIST/raw)",
        "task": "classification",
        "input_shape": (1, 28, 28),
        "num_classes": 10,
        "n_train": 60000,
        "n_test": 10000,
        "offline": False,
        "image": True,
        "augment": {"pad": 2, "flip": True},
    },
    "cifar10": {
        "description": "CIFAR-10, 32×32 colour, 10 classes (files under <root>/cifar-10-batches-py)",
        "task": "classification",
        "input_shape": (3, 32, 32),
        "num_classes": 10,
        "n_train": 50000,
        "n_test": 10000,
        "offline": False,
        "image": True,
        "augment": {"pad": 4, "flip": True},
    },
    "cifar100": {
        "description": "CIFAR-100, 32×32 colour, 100 fine classes (files under <root>/cifar-100-python)",
        "task": "classification",
        "input_shape": (3, 32, 32),
        "num_classes": 100,
        "n_train": 50000,
        "n_test": 10000,
        "offline": False,
        "image": True,
        "augment": {"pad": 4, "flip": True},
    },
}

# "augment": the crop padding scales with the image (4 of 32 px as in the standard CIFAR recipe, 1 of
# 8 px for digits); flips only where a mirrored image keeps its label (not for digits).

# Cluster means of the Gaussian mixture are drawn N(0, (SEPARATION^2 / d) I): two means lie about
# SEPARATION * sqrt(2) apart against unit noise, a pairwise Bayes error near Phi(-1.41) ~ 8%.
MIXTURE_SEPARATION = 2.0
TEACHER_HIDDEN = 64  # hidden units of the teacher network of "teacher-student"
_SYNTHETIC = ("gaussian-mixture", "teacher-student", "sparse-regression", "relu-teacher")
_STD_FLOOR = 1e-6  # features constant on the train split are left unscaled

# On-disk layouts, identical to torchvision's so that either reader finds the same files.
_IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}
# Where the standard files come from (the CIFAR archives unpack into the folder named above).
_SOURCES = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (or http://yann.lecun.com/exdb/mnist/)",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


@dataclass
class Dataset:
    """A whole dataset as tensors on one device; inputs float32, labels int64 (or float32 targets)."""

    name: str
    task: str  # "classification" | "regression"
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int | None
    input_shape: tuple[int, ...]
    is_image: bool
    description: str = ""
    mean: torch.Tensor | None = None  # standardisation statistics (train split), broadcastable to x
    std: torch.Tensor | None = None
    noisy_mask: torch.Tensor | None = None  # train samples whose label was replaced
    true_weights: torch.Tensor | None = None  # sparse regression target w*

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    @property
    def num_outputs(self) -> int:
        """Width of the model's output layer: classes, or 1 for regression."""
        return self.num_classes if self.num_classes is not None else 1

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random crop and flip with this dataset's settings (DATASET_INFO[name]["augment"])."""
        settings = DATASET_INFO[self.name].get("augment")
        if settings is None:
            raise ValueError(f"data.augment: {self.name!r} is not an image set and has no augmentation")
        return augment_images(x, generator, **settings)

    def to(self, device: str | torch.device) -> Dataset:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Dataset(**moved)


# -- public entry point ------------------------------------------------------------------------------
def load_dataset(cfg: DataConfig, device: str | torch.device = "cpu", *, download: bool = False) -> Dataset:
    """Load `cfg.name` with subsampling, label noise and standardisation applied, on `device`.

    `download=True` lets torchvision fetch MNIST / Fashion-MNIST / CIFAR into `cfg.root`; without it
    nothing is fetched and missing files raise a ValueError that says how to get them.
    """
    _check_config(cfg)
    if cfg.name in _SYNTHETIC:
        ds = _synthetic(cfg)
    else:
        ds = _real(cfg, download)
    if cfg.label_noise > 0:
        ds.y_train, ds.noisy_mask = corrupt_labels(
            ds.y_train, cfg.label_noise, ds.num_classes, generator=_stream(cfg.data_seed, "label-noise")
        )
    if cfg.standardize and ds.task == "classification":
        # Regression inputs are N(0, I) by construction and the target is defined on the raw x.
        ds.mean, ds.std = standardization_stats(ds.x_train, ds.is_image)
        ds.x_train = (ds.x_train - ds.mean) / ds.std
        ds.x_test = (ds.x_test - ds.mean) / ds.std
    return ds.to(device)


def dataset_available(name: str, root: str | Path) -> bool:
    """Whether `name` can be loaded without downloading anything."""
    if name not in DATASET_INFO:
        raise ValueError(f"data.name: must be one of {', '.join(DATASETS)} (got {name!r})")
    if DATASET_INFO[name]["offline"]:
        return True
    return not _missing_files(name, Path(root))


def _check_config(cfg: DataConfig) -> None:
    if cfg.name not in DATASET_INFO:
        raise ValueError(f"data.name: must be one of {', '.join(DATASETS)} (got {cfg.name!r})")
    for field in ("n_train", "n_test"):
        value = getattr(cfg, field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"data.{field}: must be a positive integer or None (got {value!r})")
    if not 0.0 <= cfg.label_noise < 1.0:
        raise ValueError(f"data.label_noise: must be in [0, 1) (got {cfg.label_noise!r})")
    if cfg.label_noise > 0 and DATASET_INFO[cfg.name]["task"] != "classification":
        raise ValueError(f"data.label_noise: applies to classification sets only ({cfg.name!r} is regression)")
    if cfg.name in _SYNTHETIC and cfg.n_features < 1:
        raise ValueError(f"data.n_features: must be a positive integer (got {cfg.n_features!r})")
    if cfg.name in ("gaussian-mixture", "teacher-student") and not 2 <= cfg.n_classes <= 1000:
        raise ValueError(f"data.n_classes: must be an integer in [2, 1000] (got {cfg.n_classes!r})")
    if cfg.name in ("sparse-regression", "relu-teacher"):
        if not 1 <= cfg.sparsity <= cfg.n_features:
            raise ValueError(
                f"data.sparsity: must be an integer in [1, n_features={cfg.n_features}] (got {cfg.sparsity!r})"
            )
        if cfg.noise_std < 0:
            raise ValueError(f"data.noise_std: must be >= 0 (got {cfg.noise_std!r})")


def _stream(seed: int, purpose: str) -> torch.Generator:
    """An independent CPU generator per (seed, purpose), so options don't share random draws."""
    mixed = np.random.SeedSequence([int(seed), zlib.crc32(purpose.encode())]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & (2**63 - 1))


# -- label noise and standardisation ---------------------------------------------------------------
def corrupt_labels(
    labels: torch.Tensor, fraction: float, num_classes: int, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace round(fraction * n) labels, chosen at random, by a uniformly drawn *different* class.

    Returns the new labels and the boolean mask of replaced positions.
    """
    n = labels.shape[0]
    n_noisy = int(round(fraction * n))
    chosen = torch.randperm(n, generator=generator)[:n_noisy]
    # Adding an offset in [1, C-1] modulo C moves to each other class with equal probability.
    offsets = torch.randint(1, num_classes, (n_noisy,), generator=generator)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + offsets) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return noisy, mask


def standardization_stats(x_train: torch.Tensor, is_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (images [N, C, H, W]) or per-feature mean and std of the train split."""
    dims = (0, 2, 3) if is_image else (0,)
    mean = x_train.mean(dim=dims, keepdim=True)[0]
    std = x_train.std(dim=dims, keepdim=True)[0]
    std = torch.where(std < _STD_FLOOR, torch.ones_like(std), std)
    return mean, std


def _subsample(x: torch.Tensor, y: torch.Tensor, n: int | None, field: str, seed: int):
    if n is None or n == x.shape[0]:
        return x, y
    if n > x.shape[0]:
        raise ValueError(f"data.{field}: must be at most {x.shape[0]} for this dataset (got {n})")
    keep = torch.randperm(x.shape[0], generator=_stream(seed, f"subsample-{field}"))[:n]
    return x[keep], y[keep]


# -- synthetic sets --------------------------------------------------------------------------------
def _synthetic(cfg: DataConfig) -> Dataset:
    info = DATASET_INFO[cfg.name]
    n_train = cfg.n_train if cfg.n_train is not None else info["n_train"]
    n_test = cfg.n_test if cfg.n_test is not None else info["n_test"]
    d = cfg.n_features
    truth = _stream(cfg.data_seed, "truth")
    x_train = torch.randn(n_train, d, generator=_stream(cfg.data_seed, "train-inputs"))
    x_test = torch.randn(n_test, d, generator=_stream(cfg.data_seed, "test-inputs"))
    common = dict(name=cfg.name, input_shape=(d,), is_image=False, description=info["description"])
    if cfg.name in ("sparse-regression", "relu-teacher"):
        if cfg.name == "sparse-regression":
            w_star = sparse_target(d, cfg.sparsity, truth)
            y_train, y_test = x_train @ w_star, x_test @ w_star
        else:
            w_star = relu_teacher(d, cfg.sparsity, truth)
            y_train, y_test = teacher_outputs(w_star, x_train), teacher_outputs(w_star, x_test)
        if cfg.noise_std > 0:
            y_train = y_train + cfg.noise_std * torch.randn(n_train, generator=_stream(cfg.data_seed, "noise"))
        return Dataset(task="regression", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                       num_classes=None, true_weights=w_star, **common)
    if cfg.name == "gaussian-mixture":
        means = torch.randn(cfg.n_classes, d, generator=truth) * (MIXTURE_SEPARATION / d**0.5)
        y_train = torch.randint(0, cfg.n_classes, (n_train,), generator=_stream(cfg.data_seed, "train-labels"))
        y_test = torch.randint(0, cfg.n_classes, (n_test,), generator=_stream(cfg.data_seed, "test-labels"))
        x_train = x_train + means[y_train]
        x_test = x_test + means[y_test]
    else:
        teacher = _random_teacher(d, cfg.n_classes, truth)
        # Centre the teacher's logits on a reference sample so that no class is starved.
        centre = teacher(torch.randn(4096, d, generator=_stream(cfg.data_seed, "teacher-centre"))).mean(0)
        y_train = (teacher(x_train) - centre).argmax(dim=1)
        y_test = (teacher(x_test) - centre).argmax(dim=1)
    return Dataset(task="classification", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                   num_classes=cfg.n_classes, **common)


def sparse_target(d: int, sparsity: int, generator: torch.Generator) -> torch.Tensor:
    """w* as in Andriushchenko & Flammarion 2022 (after Pesme et al. 2021): the first `sparsity`
    coordinates |N(0, 1)| draws, the rest zero, scaled to unit norm."""
    w = torch.zeros(d)
    w[:sparsity] = torch.randn(sparsity, generator=generator).abs()
    return w / w.norm()


def relu_teacher(d: int, units: int, generator: torch.Generator) -> torch.Tensor:
    """The hidden weights of the relu-teacher set: `units` independent directions uniform on the sphere
    (rows of shape [units, d], unit norm); the teacher is x -> Σ_k relu(<w*_k, x>)."""
    w = torch.randn(units, d, generator=generator)
    return w / w.norm(dim=1, keepdim=True)


def teacher_outputs(w_star: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_k relu(<w*_k, x>) for every row of x."""
    return torch.relu(x @ w_star.T).sum(dim=1)


def _random_teacher(d: int, num_classes: int, generator: torch.Generator):
    w1 = torch.randn(TEACHER_HIDDEN, d, generator=generator) / d**0.5
    b1 = torch.randn(TEACHER_HIDDEN, generator=generator) * 0.1
    w2 = torch.randn(num_classes, TEACHER_HIDDEN, generator=generator) / TEACHER_HIDDEN**0.5
    return lambda x: torch.relu(x @ w1.T + b1) @ w2.T


# -- real image sets -------------------------------------------------------------------------------
def _real(cfg: DataConfig, download: bool) -> Dataset:
    info = DATASET_INFO[cfg.name]
    if cfg.name == "digits":
        x_train, y_train, x_test, y_test = _digits(cfg.data_seed)
    else:
        x_train, y_train, x_test, y_test = _image_files(cfg.name, Path(cfg.root), download)
    x_train, y_train = _subsample(x_train, y_train, cfg.n_train, "n_train", cfg.data_seed)
    x_test, y_test = _subsample(x_test, y_test, cfg.n_test, "n_test", cfg.data_seed)
    return Dataset(name=cfg.name, task="classification", x_train=x_train, y_train=y_train, x_test=x_test,
                   y_test=y_test, num_classes=info["num_classes"], input_shape=info["input_shape"],
                   is_image=True, description=info["description"])


def _digits(seed: int):
    """scikit-learn's 1797 digits, scaled to [0, 1], split 1437 / 360 by a seeded permutation."""
    images, target = _digits_file()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.int64)
    order = torch.randperm(x.shape[0], generator=_stream(seed, "digits-split"))
    n_train = DATASET_INFO["digits"]["n_train"]
    train, test = order[:n_train], order[n_train:]
    return x[train], y[train], x[test], y[test]


def _digits_file() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8], labels) read from the CSV file scikit-learn ships (each row: 64 pixel values,
    then the label), as `sklearn.datasets.load_digits` reads it, without importing scikit-learn (whose
    import alone takes seconds, longer than a small analysis)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("data.name: 'digits' needs scikit-learn (pip install scikit-learn)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def _image_files(name: str, root: Path, download: bool):
    """(x_train, y_train, x_test, y_test) as float [N, C, H, W] in [0, 1] and int64 labels."""
    if _torchvision() is not None:
        return _via_torchvision(name, root, download)
    if download:
        raise ValueError(f"data.name: downloading {name!r} needs torchvision. {_how_to_get(name, root)}")
    missing = _missing_files(name, root)
    if missing:
        raise ValueError(f"data.name: {name!r} not found (missing {missing[0]}). {_how_to_get(name, root)}")
    if name in _IDX_FOLDERS:
        return (*_read_idx_split(name, root, "train"), *_read_idx_split(name, root, "test"))
    return (*_read_cifar_split(name, root, "train"), *_read_cifar_split(name, root, "test"))


def _torchvision():
    try:
        import torchvision
    except Exception:  # not installed, or built against another torch: use the readers below
        return None
    return torchvision


def _via_torchvision(name: str, root: Path, download: bool):
    datasets = _torchvision().datasets
    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST,
           "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as err:
            raise ValueError(f"data.name: {name!r} not found or corrupted ({err}). {_how_to_get(name, root)}") from err
        images = torch.as_tensor(np.asarray(ds.data))
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # to [N, C, H, W]
        splits += [images.float() / 255.0, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)]
    return tuple(splits)


def _how_to_get(name: str, root: Path) -> str:
    where = _expected_folder(name, root)
    files = ", ".join(_expected_files(name))
    if name in _CIFAR_LAYOUT:
        manual = f"download {_SOURCES[name]} and unpack it into {root} (it creates {where} with {files})"
    else:
        manual = f"download {files} (.gz is fine) from {_SOURCES[name]} into {where}"
    return (
        f"To use it: (1) pip install torchvision (the build matching this torch) and call "
        f"load_dataset(cfg, download=True) once; or (2) {manual}; or (3) pick an offline set: digits, gaussian-mixture, teacher-student, "
        f"sparse-regression."
    )


def _expected_folder(name: str, root: Path) -> Path:
    if name in _IDX_FOLDERS:
        return root / _IDX_FOLDERS[name] / "raw"
    return root / _CIFAR_LAYOUT[name][0]


def _expected_files(name: str) -> list[str]:
    if name in _IDX_FOLDERS:
        return [f for pair in _IDX_FILES.values() for f in pair]
    _, train, test, _ = _CIFAR_LAYOUT[name]
    return train + test


def _missing_files(name: str, root: Path) -> list[str]:
    folder = _expected_folder(name, root)
    gz_ok = name in _IDX_FOLDERS
    return [
        str(folder / f) for f in _expected_files(name)
        if not (folder / f).is_file() and not (gz_ok and (folder / f"{f}.gz").is_file())
    ]


# IDX (MNIST, Fashion-MNIST): big-endian int32 magic (0, 0, type 0x08 = uint8, ndim), dims, raw bytes.
def read_idx(path: str | Path, expected_magic: int) -> torch.Tensor:
    """Read an IDX file (optionally gzipped) of unsigned bytes into a uint8 tensor."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (too short)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: IDX magic number {magic}, expected {expected_magic}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX body has {len(body)} bytes, header says {dims}")
    return torch.from_numpy(np.frombuffer(body, dtype=np.uint8).reshape(dims).copy())


def _idx_path(folder: Path, filename: str) -> Path:
    plain = folder / filename
    return plain if plain.is_file() else folder / f"{filename}.gz"


def _read_idx_split(name: str, root: Path, split: str):
    folder = _expected_folder(name, root)
    images_file, labels_file = _IDX_FILES[split]
    images = read_idx(_idx_path(folder, images_file), _IDX_IMAGES_MAGIC)
    labels = read_idx(_idx_path(folder, labels_file), _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: {images.shape[0]} {split} images but {labels.shape[0]} labels")
    return images.unsqueeze(1).float() / 255.0, labels.long()


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR python batches: plain containers and numpy arrays, nothing executable."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR python batch: dict with b"data" uint8 [N, 3072] (R, G, B planes of 32×32) and labels."""
    path = Path(path)
    with path.open("rb") as fh:
        batch = _ArrayUnpickler(io.BufferedReader(fh), encoding="bytes").load()
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: not a CIFAR batch (needs keys b'data' and {label_key!r})")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' has shape {data.shape}, expected [N, 3072]")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    labels = torch.as_tensor(np.asarray(batch[label_key]), dtype=torch.int64)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def _read_cifar_split(name: str, root: Path, split: str):
    folder, train_files, test_files, label_key = _CIFAR_LAYOUT[name]
    parts = [read_cifar_batch(root / folder / f, label_key) for f in (train_files if split == "train" else test_files)]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    return images.float() / 255.0, labels


# -- batching and augmentation ---------------------------------------------------------------------
def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (x, y) batches sliced on the tensors' device, in the order of a seeded randperm."""
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"y: {y.shape[0]} targets for {n} inputs")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer (got {batch_size!r})")
    if drop_last and batch_size > n:
        raise ValueError(f"batch_size: {batch_size} exceeds the {n} samples, so drop_last=True would give no batch")
    if shuffle:
        if generator is None:
            raise ValueError("generator: shuffle=True needs a seeded torch.Generator")
        order = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
    else:
        order = torch.arange(n, device=x.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start: start + batch_size]
        yield x[idx], y[idx.to(y.device)]


def augment_images(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    pad: int = 4,
    flip: bool = True,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Random crop after padding by `pad` (zeros or reflect) and random horizontal flip, batched.

    x is [N, C, H, W] on any device; offsets and flips are drawn from `generator` (one crop offset
    and one coin per image), so the same generator state gives the same augmented batch.
    """
    if x.ndim != 4:
        raise ValueError(f"x: augment_images needs [N, C, H, W] images (got shape {tuple(x.shape)})")
    if padding_mode not in ("zeros", "reflect"):
        raise ValueError(f"padding_mode: must be 'zeros' or 'reflect' (got {padding_mode!r})")
    n, _, h, w = x.shape
    if pad < 0 or (padding_mode == "reflect" and pad >= min(h, w)):
        raise ValueError(f"pad: must be in [0, {min(h, w) - 1 if padding_mode == 'reflect' else 'inf'}) (got {pad})")
    gen_device = generator.device
    out = x
    if pad > 0:
        mode = "constant" if padding_mode == "zeros" else "reflect"
        padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
        top = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gen_device).to(x.device)
        left = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gen_device).to(x.device)
        rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [N, H, 1]
        cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [N, 1, W]
        batch = torch.arange(n, device=x.device)[:, None, None]
        out = padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # advanced indexing gives [N, H, W, C]
    if flip:
        coins = torch.rand(n, generator=generator, device=gen_device).to(x.device) < 0.5
        out = torch.where(coins[:, None, None, None], out.flip(-1), out)
    return out.contiguous()
