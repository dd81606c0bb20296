"""Datasets: splits, seeds, label noise, standardisation, synthetic sets, on-disk readers, batching, augmentation."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from samlab import data as data_module
from samlab.config import DataConfig
from samlab.data import augment_images, dataset_available, iterate_batches, load_dataset


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def sorted_rows(x: torch.Tensor) -> np.ndarray:
    flat = x.reshape(x.shape[0], -1).numpy()
    return flat[np.lexsort(flat.T[::-1])]


# -- digits --------------------------------------------------------------------------------------
def test_digits_shapes_and_split_partition_the_sklearn_set():
    ds = load_dataset(cfg(name="digits", standardize=False))
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.y_train.dtype == torch.int64 and ds.x_train.dtype == torch.float32
    assert ds.num_classes == 10 and ds.input_shape == (1, 8, 8) and ds.is_image and ds.task == "classification"
    bunch = load_digits()
    ours = torch.cat([ds.x_train, ds.x_test]).reshape(-1, 64) * 16.0
    with_labels = torch.cat([ours, torch.cat([ds.y_train, ds.y_test]).float()[:, None]], dim=1)
    theirs = np.concatenate([bunch.data, bunch.target[:, None]], axis=1)
    np.testing.assert_allclose(sorted_rows(with_labels), sorted_rows(torch.tensor(theirs, dtype=torch.float32)))


def test_digits_file_reader_is_sklearn_load_digits_row_for_row():
    # samlab reads scikit-learn's CSV itself (no sklearn import); the order matters for the seeded split
    from samlab.data import _digits_file

    images, target = _digits_file()
    bunch = load_digits()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(target, bunch.target)


def test_digits_split_is_seeded():
    a = load_dataset(cfg(name="digits"))
    b = load_dataset(cfg(name="digits"))
    c = load_dataset(cfg(name="digits", data_seed=1))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)


def test_subsampling_is_seeded_subset_and_bounded():
    full = load_dataset(cfg(name="digits", standardize=False))
    sub = load_dataset(cfg(name="digits", standardize=False, n_train=100, n_test=50))
    again = load_dataset(cfg(name="digits", standardize=False, n_train=100, n_test=50))
    assert sub.n_train == 100 and sub.n_test == 50
    assert torch.equal(sub.x_train, again.x_train)
    full_rows = {tuple(r) for r in full.x_train.reshape(full.n_train, -1).tolist()}
    assert all(tuple(r) in full_rows for r in sub.x_train.reshape(100, -1).tolist())
    with pytest.raises(ValueError, match="data.n_train: must be at most 1437"):
        load_dataset(cfg(name="digits", n_train=5000))


# -- label noise ---------------------------------------------------------------------------------
def test_label_noise_exact_fraction_train_only_different_class():
    clean = load_dataset(cfg(name="digits"))
    noisy = load_dataset(cfg(name="digits", label_noise=0.3))
    expected = round(0.3 * clean.n_train)
    changed = noisy.y_train != clean.y_train
    assert int(changed.sum()) == expected  # every replaced label is a *different* class
    assert torch.equal(changed, noisy.noisy_mask)
    assert torch.equal(noisy.y_test, clean.y_test) and torch.equal(noisy.x_train, clean.x_train)
    assert noisy.y_train.min() >= 0 and noisy.y_train.max() < 10


def test_label_noise_is_seeded_and_spreads_over_classes():
    a = load_dataset(cfg(name="digits", label_noise=0.5))
    b = load_dataset(cfg(name="digits", label_noise=0.5))
    c = load_dataset(cfg(name="digits", label_noise=0.5, data_seed=3))
    assert torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.noisy_mask, c.noisy_mask)
    clean = load_dataset(cfg(name="digits"))
    offsets = (a.y_train - clean.y_train)[a.noisy_mask] % 10
    assert set(offsets.tolist()) == set(range(1, 10))  # all nine other classes are used


def test_label_noise_refused_for_regression():
    with pytest.raises(ValueError, match="data.label_noise"):
        load_dataset(cfg(name="sparse-regression", label_noise=0.1))


# -- standardisation -----------------------------------------------------------------------------
def test_standardize_uses_train_statistics_per_channel():
    raw = load_dataset(cfg(name="digits", standardize=False))
    std = load_dataset(cfg(name="digits", standardize=True))
    mean = raw.x_train.mean()
    sd = raw.x_train.std()  # one channel: statistics over all train pixels
    torch.testing.assert_close(std.x_train, (raw.x_train - mean) / sd)
    torch.testing.assert_close(std.x_test, (raw.x_test - mean) / sd)
    assert abs(float(std.x_test.mean())) > 1e-3  # the test split is not re-centred on itself


def test_standardize_per_feature_on_vectors():
    raw = load_dataset(cfg(name="gaussian-mixture", standardize=False))
    std = load_dataset(cfg(name="gaussian-mixture"))
    torch.testing.assert_close(std.x_train.mean(0), torch.zeros(30), atol=1e-5, rtol=0)
    torch.testing.assert_close(std.x_train.std(0), torch.ones(30), atol=1e-5, rtol=0)
    by_hand = (raw.x_test - raw.x_train.mean(0)) / raw.x_train.std(0)
    torch.testing.assert_close(std.x_test, by_hand)


# -- synthetic sets --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gaussian-mixture", "teacher-student"])
def test_synthetic_classification_seeded_with_shapes(name):
    a = load_dataset(cfg(name=name, n_train=200, n_test=100, n_features=7, n_classes=4))
    b = load_dataset(cfg(name=name, n_train=200, n_test=100, n_features=7, n_classes=4))
    c = load_dataset(cfg(name=name, n_train=200, n_test=100, n_features=7, n_classes=4, data_seed=9))
    assert a.x_train.shape == (200, 7) and a.x_test.shape == (100, 7) and a.input_shape == (7,)
    assert a.num_classes == 4 and set(a.y_train.tolist()) == {0, 1, 2, 3}
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)


@pytest.mark.parametrize("name", ["gaussian-mixture", "teacher-student"])
def test_synthetic_labels_are_learnable_from_inputs(name):
    """A 1-nearest-neighbour rule on the train split beats chance clearly: labels depend on x."""
    ds = load_dataset(cfg(name=name, n_train=1000, n_test=300, n_features=10, n_classes=4))
    nearest = torch.cdist(ds.x_test, ds.x_train).argmin(dim=1)
    accuracy = (ds.y_train[nearest] == ds.y_test).float().mean()
    assert accuracy > 0.5  # chance is 0.25


def test_sparse_regression_targets_exact_without_noise():
    ds = load_dataset(cfg(name="sparse-regression", n_features=30, sparsity=3, standardize=True))
    assert ds.task == "regression" and ds.num_classes is None and ds.num_outputs == 1
    assert ds.n_train == 20 and ds.n_test == 1000 and ds.x_train.shape == (20, 30)
    w = ds.true_weights
    assert int((w != 0).sum()) == 3 and bool((w >= 0).all())
    torch.testing.assert_close(w.norm(), torch.tensor(1.0))
    torch.testing.assert_close(ds.y_train.double(), ds.x_train.double() @ w.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ds.y_test.double(), ds.x_test.double() @ w.double(), atol=1e-6, rtol=0)
    # Inputs are N(0, I): left raw even with standardize=True, so y = <w*, x> holds on what is returned.
    assert abs(float(ds.x_test.mean())) < 0.05 and abs(float(ds.x_test.std()) - 1) < 0.05


def test_sparse_regression_noise_on_train_targets_only():
    clean = load_dataset(cfg(name="sparse-regression", n_train=2000, sparsity=5))
    noisy = load_dataset(cfg(name="sparse-regression", n_train=2000, sparsity=5, noise_std=0.5))
    residual = noisy.y_train - noisy.x_train @ noisy.true_weights
    assert abs(float(residual.std()) - 0.5) < 0.03
    assert torch.equal(noisy.y_test, clean.y_test) and torch.equal(noisy.x_train, clean.x_train)


def test_bad_synthetic_fields_name_the_field():
    with pytest.raises(ValueError, match="data.sparsity"):
        load_dataset(cfg(name="sparse-regression", n_features=5, sparsity=6))
    with pytest.raises(ValueError, match="data.n_classes"):
        load_dataset(cfg(name="teacher-student", n_classes=1))
    with pytest.raises(ValueError, match="data.name"):
        load_dataset(cfg(name="imagenet"))


# -- on-disk readers -------------------------------------------------------------------------------
@pytest.fixture
def no_torchvision(monkeypatch):
    monkeypatch.setattr(data_module, "_torchvision", lambda: None)


def write_cifar_batch(path, images: np.ndarray, labels: list[int], label_key: bytes, protocol: int = 2) -> None:
    """The real layout: a pickled dict with bytes keys, b"data" uint8 [N, 3072] as R, G, B planes."""
    batch = {b"batch_label": b"test", b"data": images.reshape(len(labels), -1), label_key: labels,
             b"filenames": [b"img%d.png" % i for i in range(len(labels))]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [lab // 5 for lab in labels]
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def random_images(rng, n):
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def test_cifar10_reader_on_real_format(tmp_path, no_torchvision):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train_images, train_labels = [], []
    for i in range(1, 6):
        imgs, labs = random_images(rng, 3), rng.integers(0, 10, 3).tolist()
        write_cifar_batch(folder / f"data_batch_{i}", imgs, labs, b"labels")
        train_images.append(imgs)
        train_labels += labs
    test_imgs, test_labs = random_images(rng, 4), rng.integers(0, 10, 4).tolist()
    write_cifar_batch(folder / "test_batch", test_imgs, test_labs, b"labels")
    assert dataset_available("cifar10", tmp_path)

    ds = load_dataset(cfg(name="cifar10", root=str(tmp_path), standardize=False))
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32) and ds.num_classes == 10
    expected = np.concatenate(train_images).astype(np.float32) / 255.0
    np.testing.assert_array_equal(ds.x_train.numpy(), expected)
    # Pixel (row 5, col 7) of the green plane sits at 1024 + 5 * 32 + 7 of the flat row.
    flat = test_imgs.reshape(4, -1)
    assert ds.x_test[2, 1, 5, 7].item() == pytest.approx(flat[2, 1024 + 5 * 32 + 7] / 255.0)
    assert ds.y_train.tolist() == train_labels and ds.y_test.tolist() == test_labs


def test_cifar100_reader_uses_fine_labels(tmp_path, no_torchvision):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train_labs, test_labs = [3, 97, 50, 12], [99, 0]
    # Files re-pickled at the newest protocol (numpy arrays via _frombuffer) are accepted too.
    write_cifar_batch(folder / "train", random_images(rng, 4), train_labs, b"fine_labels", pickle.HIGHEST_PROTOCOL)
    write_cifar_batch(folder / "test", random_images(rng, 2), test_labs, b"fine_labels", pickle.HIGHEST_PROTOCOL)
    ds = load_dataset(cfg(name="cifar100", root=str(tmp_path)))
    assert ds.num_classes == 100 and ds.y_train.tolist() == train_labs and ds.y_test.tolist() == test_labs


def test_cifar_reader_refuses_executable_pickles(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("should never run",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Exploit(), b"labels": [0]}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        data_module.read_cifar_batch(path, b"labels")


def write_idx(path, array: np.ndarray, magic: int, compress: bool) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_idx_reader_plain_and_gzipped(tmp_path, no_torchvision, name, folder):
    rng = np.random.default_rng(2)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    train_x, train_y = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 6)
    test_x, test_y = rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3)
    write_idx(raw / "train-images-idx3-ubyte", train_x, 2051, compress=True)
    write_idx(raw / "train-labels-idx1-ubyte", train_y, 2049, compress=True)
    write_idx(raw / "t10k-images-idx3-ubyte", test_x, 2051, compress=False)
    write_idx(raw / "t10k-labels-idx1-ubyte", test_y, 2049, compress=False)
    ds = load_dataset(cfg(name=name, root=str(tmp_path), standardize=False))
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.input_shape == (1, 28, 28)
    np.testing.assert_array_equal(ds.x_train[:, 0].numpy(), train_x.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(ds.x_test[:, 0].numpy(), test_x.astype(np.float32) / 255.0)
    assert ds.y_train.tolist() == train_y.tolist() and ds.y_test.tolist() == test_y.tolist()


def test_idx_reader_checks_magic_and_length(tmp_path):
    labels = tmp_path / "labels"
    write_idx(labels, np.arange(5), 2049, compress=False)
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        data_module.read_idx(labels, 2051)
    labels.write_bytes(labels.read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        data_module.read_idx(labels, 2049)


@pytest.mark.parametrize(("name", "folder"), [("cifar10", "cifar-10-batches-py"), ("mnist", "MNIST/raw")])
def test_missing_files_explain_how_to_get_them(tmp_path, no_torchvision, name, folder):
    assert not dataset_available(name, tmp_path)
    with pytest.raises(ValueError) as err:
        load_dataset(cfg(name=name, root=str(tmp_path)))
    message = str(err.value)
    assert "pip install torchvision" in message and str(tmp_path / folder) in message
    assert "https://" in message and "digits" in message
    with pytest.raises(ValueError, match="downloading .* needs torchvision"):
        load_dataset(cfg(name=name, root=str(tmp_path)), download=True)


# -- batching ----------------------------------------------------------------------------------------
def test_iterate_batches_covers_each_sample_once_and_is_reproducible():
    x = torch.arange(23, dtype=torch.float32)[:, None].repeat(1, 2)
    y = torch.arange(23)
    epoch = list(iterate_batches(x, y, 5, generator=torch.Generator().manual_seed(4), drop_last=False))
    seen = torch.cat([b[1] for b in epoch])
    assert sorted(seen.tolist()) == list(range(23)) and [len(b[1]) for b in epoch] == [5, 5, 5, 5, 3]
    assert all(torch.equal(bx[:, 0].long(), by) for bx, by in epoch)  # inputs and targets stay paired
    dropped = list(iterate_batches(x, y, 5, generator=torch.Generator().manual_seed(4)))
    assert len(dropped) == 4 and len(set(torch.cat([b[1] for b in dropped]).tolist())) == 20
    again = list(iterate_batches(x, y, 5, generator=torch.Generator().manual_seed(4), drop_last=False))
    other = list(iterate_batches(x, y, 5, generator=torch.Generator().manual_seed(5), drop_last=False))
    assert torch.equal(seen, torch.cat([b[1] for b in again]))
    assert not torch.equal(seen, torch.cat([b[1] for b in other]))
    in_order = list(iterate_batches(x, y, 5, generator=None, shuffle=False, drop_last=False))
    assert torch.cat([b[1] for b in in_order]).tolist() == list(range(23))


def test_iterate_batches_validates():
    x, y = torch.zeros(4, 2), torch.zeros(4)
    with pytest.raises(ValueError, match="batch_size"):
        list(iterate_batches(x, y, 8, generator=torch.Generator()))
    with pytest.raises(ValueError, match="generator"):
        list(iterate_batches(x, y, 2, generator=None))


# -- augmentation ------------------------------------------------------------------------------------
def crops_of(image: np.ndarray, pad: int, mode: str) -> list[np.ndarray]:
    """Every crop the augmentation may produce, by numpy padding and slicing (independent oracle)."""
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="constant" if mode == "zeros" else "reflect")
    h, w = image.shape[1:]
    return [padded[:, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_crop_matches_a_padded_window_and_visits_every_offset(mode):
    image = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6) + 1
    batch = torch.from_numpy(image).expand(200, -1, -1, -1)
    out = augment_images(batch, torch.Generator().manual_seed(0), pad=2, flip=False, padding_mode=mode)
    assert out.shape == batch.shape
    candidates = crops_of(image, 2, mode)
    hits = [next(k for k, c in enumerate(candidates) if np.array_equal(c, o)) for o in out.numpy()]
    assert set(hits) == set(range(25))


def test_flip_mirrors_columns_and_is_seeded():
    image = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5)
    batch = image.expand(64, -1, -1, -1)
    out = augment_images(batch, torch.Generator().manual_seed(1), pad=0, flip=True)
    mirrored = image[:, :, [4, 3, 2, 1, 0]]
    is_flipped = [torch.equal(o, mirrored) for o in out]
    assert all(f or torch.equal(o, image) for f, o in zip(is_flipped, out))
    assert 0 < sum(is_flipped) < 64
    same = augment_images(batch, torch.Generator().manual_seed(1), pad=0, flip=True)
    other = augment_images(batch, torch.Generator().manual_seed(2), pad=0, flip=True)
    assert torch.equal(out, same) and not torch.equal(out, other)


def test_augment_validates_inputs():
    with pytest.raises(ValueError, match="x: augment_images needs"):
        augment_images(torch.zeros(3, 8, 8), torch.Generator())
    with pytest.raises(ValueError, match="pad"):
        augment_images(torch.zeros(1, 1, 4, 4), torch.Generator(), pad=4, padding_mode="reflect")


def test_device_argument_places_all_tensors():
    ds = load_dataset(cfg(name="sparse-regression"), device=torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds.true_weights))


# -- the torchvision path ----------------------------------------------------------------------------
class FakeVisionSet:
    """Stands in for torchvision.datasets classes: their documented `.data` / `.targets` layouts."""

    splits: dict[bool, tuple] = {}
    calls: list = []

    def __init__(self, root, train, download):
        type(self).calls.append((root, train, download))
        if train not in self.splits:
            raise RuntimeError("Dataset not found. You can use download=True to download it")
        self.data, self.targets = self.splits[train]


def fake_torchvision(cls):
    datasets = type("datasets", (), {"MNIST": cls, "FashionMNIST": cls, "CIFAR10": cls, "CIFAR100": cls})
    return type("torchvision", (), {"datasets": datasets})


def test_torchvision_cifar_layout_matches_the_pickle_reader(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [(random_images(rng, 2), rng.integers(0, 10, 2).tolist()) for _ in range(6)]
    for name, (imgs, labs) in zip([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], batches):
        write_cifar_batch(folder / name, imgs, labs, b"labels")
    monkeypatch.setattr(data_module, "_torchvision", lambda: None)
    native = load_dataset(cfg(name="cifar10", root=str(tmp_path)))

    class FakeCIFAR(FakeVisionSet):  # torchvision keeps CIFAR as HWC numpy uint8 and a list of labels
        splits = {
            True: (np.concatenate([b[0] for b in batches[:5]]).transpose(0, 2, 3, 1), sum([b[1] for b in batches[:5]], [])),
            False: (batches[5][0].transpose(0, 2, 3, 1), batches[5][1]),
        }
        calls = []

    monkeypatch.setattr(data_module, "_torchvision", lambda: fake_torchvision(FakeCIFAR))
    via = load_dataset(cfg(name="cifar10", root=str(tmp_path)))
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(native, field), getattr(via, field)), field
    assert FakeCIFAR.calls == [(str(tmp_path), True, False), (str(tmp_path), False, False)]


def test_torchvision_mnist_layout_and_missing_files(tmp_path, monkeypatch):
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)

    class FakeMNIST(FakeVisionSet):  # torchvision keeps MNIST as a uint8 tensor [N, 28, 28]
        splits = {True: (images, torch.tensor([1, 2, 3, 4])), False: (images[:2], torch.tensor([5, 6]))}
        calls = []

    monkeypatch.setattr(data_module, "_torchvision", lambda: fake_torchvision(FakeMNIST))
    ds = load_dataset(cfg(name="mnist", root=str(tmp_path), standardize=False), download=True)
    assert ds.x_train.shape == (4, 1, 28, 28) and ds.y_test.tolist() == [5, 6]
    torch.testing.assert_close(ds.x_train[:, 0], images.float() / 255.0)
    assert FakeMNIST.calls[0] == (str(tmp_path), True, True)

    class Absent(FakeVisionSet):
        splits = {}
        calls = []

    monkeypatch.setattr(data_module, "_torchvision", lambda: fake_torchvision(Absent))
    with pytest.raises(ValueError, match="not found or corrupted .*download=True"):
        load_dataset(cfg(name="fashion-mnist", root=str(tmp_path)))


def test_dataset_augment_uses_label_preserving_settings():
    """Digits: crops padded by 1 pixel of 8 and never mirrored (a mirrored digit is another symbol)."""
    ds = load_dataset(cfg(name="digits", standardize=False, n_train=64))
    out = ds.augment(ds.x_train, torch.Generator().manual_seed(0))
    for image, augmented in zip(ds.x_train.numpy(), out.numpy()):
        assert any(np.array_equal(c, augmented) for c in crops_of(image, 1, "zeros"))
    with pytest.raises(ValueError, match="data.augment"):
        load_dataset(cfg(name="gaussian-mixture", n_train=10)).augment(torch.zeros(2, 30), torch.Generator())
