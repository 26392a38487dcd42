from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch

from hw_dq import data
from hw_dq.errors import DataError


def test_embedded_sample_is_real_cifar10():
    tr, te = data.load_split("sample", "train"), data.load_split("sample", "test")
    assert tr.x.shape == (4000, 32, 32, 3) and te.x.shape == (1000, 32, 32, 3)
    assert tr.x.dtype == np.uint8 and tr.y.dtype == np.int64
    assert set(np.unique(te.y)) == set(range(10))
    # the first official test image (a cat) is stored losslessly: check its known SHA-256
    import hashlib

    digest = hashlib.sha256(te.x[0].tobytes()).hexdigest()
    assert digest == "af12e1241a1e7a0c9ba326825279bef5fe961ceb5f95212a99f9b1f22711f913"
    assert te.y[0] == 3


def test_tensors_are_exact_k_over_255():
    x, y = data.load_split("sample", "test").take(16).tensors()
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(torch.round(x * 255) / 255, x)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_npz_dir_single_and_parts(tmp_path):
    rng = np.random.default_rng(0)
    src = data.load_split("sample", "test")
    np.savez_compressed(tmp_path / "mine_train_part1.npz", x=src.x[:10], y=src.y[:10])
    np.savez_compressed(tmp_path / "mine_train_part2.npz", x=src.x[10:25], y=src.y[10:25])
    np.savez_compressed(tmp_path / "test.npz", x=src.x[:7], y=src.y[:7])
    tr = data.load_split("npz", "train", tmp_path)
    te = data.load_split("npz", "test", tmp_path)
    assert len(tr) == 25 and np.array_equal(tr.x, src.x[:25])
    assert len(te) == 7
    del rng


def test_shared_data_layout(shared_data):
    te = data.load_split("cifar10", "test", shared_data)
    assert len(te) == 10000 and np.bincount(te.y).tolist() == [1000] * 10


def test_svhn_mat_format(tmp_path):
    src = data.load_split("sample", "test")
    x = np.transpose(src.x[:12], (1, 2, 3, 0))  # SVHN stores 32x32x3xN
    y = np.arange(12).reshape(-1, 1) % 10
    y[y == 0] = 10  # SVHN's label for the digit 0
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": y})
    ds = data.load_split("svhn", "test", tmp_path)
    assert ds.x.shape == (12, 32, 32, 3) and np.array_equal(ds.x, src.x[:12])
    assert ds.y.tolist() == [i % 10 for i in range(12)]


@pytest.mark.parametrize(
    "name, files, needle",
    [
        ("npz", {}, "no train data in"),
        ("svhn", {}, "train_32x32.mat not found"),
        ("cifar10", {}, "CIFAR-10 not found"),
        ("npz", {"train.npz": b"not a zip file"}, "not a readable .npz"),
        ("svhn", {"train_32x32.mat": b"garbage"}, "not an SVHN format-2 .mat"),
    ],
)
def test_missing_or_corrupt_data_names_path(tmp_path, name, files, needle):
    for fname, content in files.items():
        (tmp_path / fname).write_bytes(content)
    with pytest.raises(DataError) as e:
        data.load_split(name, "train", tmp_path)
    assert needle in str(e.value) and str(tmp_path) in str(e.value)
    assert "\n" not in str(e.value)


def test_npz_wrong_layout(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.zeros((4, 3, 32, 32), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="uint8 N x H x W x C"):
        data.load_split("npz", "train", tmp_path)
    np.savez(tmp_path / "train.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="missing array"):
        data.load_split("npz", "train", tmp_path)


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="choose one of sample, cifar10, svhn, npz"):
        data.load_split("imagenet", "train")


def test_augment_is_crop_and_flip():
    x, _ = data.load_split("sample", "test").take(8).tensors()
    g = torch.Generator().manual_seed(0)
    out = data.augment(x, g)
    assert out.shape == x.shape
    # every output is a shifted (and maybe flipped) window of the zero-padded input
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(8):
        found = any(
            torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1))
            for dy in range(9)
            for dx in range(9)
            for w in [padded[i, :, dy : dy + 32, dx : dx + 32]]
        )
        assert found


def test_batches_deterministic_and_sharded():
    ds = data.load_split("sample", "train").take(256)
    a = list(data.iterate_batches(ds, 64, train=True, seed=1, epoch=2))
    b = list(data.iterate_batches(ds, 64, train=True, seed=1, epoch=2, start_step=2))
    assert torch.equal(a[2][0], b[0][0]) and torch.equal(a[3][1], b[1][1])
    r0 = list(data.iterate_batches(ds, 64, train=True, seed=1, epoch=2, rank=0, world_size=2))
    r1 = list(data.iterate_batches(ds, 64, train=True, seed=1, epoch=2, rank=1, world_size=2))
    assert r0[0][0].shape[0] == 32 and r1[0][0].shape[0] == 32
    assert sorted(torch.cat([r0[0][1], r1[0][1]]).tolist()) == sorted(a[0][1].tolist())
    c = list(data.iterate_batches(ds, 64, train=True, seed=1, epoch=3))
    assert not torch.equal(a[0][0], c[0][0])


def test_channels_and_classes_come_from_the_data(tmp_path):
    """A one-channel dataset and a 100-class dataset are read with their own shape and class count."""
    rng = np.random.default_rng(0)
    gray, many = tmp_path / "gray", tmp_path / "many"
    gray.mkdir(), many.mkdir()
    x1 = rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
    np.savez(gray / "train.npz", x=x1, y=np.arange(20) % 10)
    np.savez(many / "train.npz", x=rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), y=np.arange(200) % 100)
    g, m = data.load_split("npz", "train", gray), data.load_split("npz", "train", many)
    assert (g.channels, g.num_classes, g.image_shape) == (1, 10, (1, 28, 28))
    assert (m.channels, m.num_classes) == (3, 100) and m.take(5).num_classes == 100
    two = tmp_path / "two"
    two.mkdir()
    np.savez(two / "train.npz", x=x1, y=np.arange(20) % 2)
    assert data.load_split("npz", "train", two).num_classes == 2  # not padded to CIFAR-10's ten
    s = data.load_split("sample", "test")
    assert (s.channels, s.num_classes, s.take(3).num_classes) == (3, 10, 10)  # declared, even for a subset


def test_labels_beyond_the_declared_classes_are_rejected(tmp_path):
    x = np.zeros((4, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "cifar10_test.npz", x=x, y=np.array([0, 3, 9, 10]))
    with pytest.raises(DataError, match=r"labels must lie in 0..9 \(10 classes\), found 10"):
        data.load_split("cifar10", "test", tmp_path)
