"""Datasets as uint8 NHWC arrays, and a deterministic batch iterator with augmentation.

Images stay in [0, 1] with no normalisation outside the model: the model's first
quantizer maps pixels exactly onto 8-bit integers (scale 1/255), as a FINN accelerator
takes UINT8 images.

Sources (``name``):

* ``sample``  - a real CIFAR-10 sample shipped inside the package (4,000 train and
  1,000 test images, the lossless originals); the default for the demo and the tests.
* ``cifar10`` - a directory with ``cifar10_train*.npz`` / ``cifar10_test.npz`` (the
  layout of ``shared/data``) or torchvision's ``cifar-10-batches-py`` (downloaded with
  ``download=True`` where the internet is reachable).
* ``svhn``    - torchvision's ``{train,test}_32x32.mat`` files (downloaded likewise).
* ``npz``     - your own data: ``{split}.npz`` or ``*_{split}.npz`` / ``*_{split}_part*.npz``
  files with keys ``x`` (uint8, N x H x W x C) and ``y`` (int labels).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from hw_dq.errors import DataError

DATASETS = ("sample", "cifar10", "svhn", "npz")
SPLITS = ("train", "test")
NUM_CLASSES = 10
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
MIN_SIDE, MAX_SIDE = 4, 4096  # image sides every model here can take (4x4 after the stem), and a sane bound
MAX_CLASSES = 10_000  # labels of your own data set the model's output count: a stray huge label is an error
NPZ_LAYOUT = (
    "expected {split}.npz, *_{split}.npz or *_{split}_part*.npz with keys x (uint8 N x H x W x C) and y (int labels)"
)


@dataclass(frozen=True)
class ArrayDataset:
    """Images as uint8 NHWC and labels as int64, with the name of where they came from.

    ``classes``: the class count the source declares (10 for CIFAR-10 and SVHN); 0 for your
    own ``npz`` data, whose class count is then read from its labels.
    """

    x: np.ndarray
    y: np.ndarray
    name: str
    classes: int = 0

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def channels(self) -> int:
        """Image channels (1 or 3), from the data."""
        return int(self.x.shape[-1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image as the model sees it."""
        return self.channels, int(self.x.shape[1]), int(self.x.shape[2])

    @property
    def num_classes(self) -> int:
        """The declared class count, else the largest label + 1 (the labels 0..K-1 of your data)."""
        if self.classes:
            return self.classes
        return int(self.y.max()) + 1 if len(self) else NUM_CLASSES

    def take(self, n: int | None, seed: int = 0) -> ArrayDataset:
        """A class-mixed subset of ``n`` examples (all if ``n`` is None or too large)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise DataError(f"cannot take {n} examples from {self.name}: n must be positive")
        idx = np.random.default_rng(seed).permutation(len(self))[:n]
        idx.sort()
        # a subset keeps the whole set's class count, even if it misses a class
        return ArrayDataset(self.x[idx], self.y[idx], f"{self.name}[:{n}]", self.num_classes)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as float NCHW in [0, 1] and labels as int64."""
        return to_float(torch.from_numpy(self.x)), torch.from_numpy(self.y)


def to_float(x_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1] (exactly k/255)."""
    return x_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def default_data_dir() -> Path:
    """``$HW_DQ_DATA`` or ``~/.cache/hw-dq/data``."""
    return Path(os.environ.get("HW_DQ_DATA", Path.home() / ".cache" / "hw-dq" / "data"))


def _validate(x: np.ndarray, y: np.ndarray, where: str, classes: int = 0) -> ArrayDataset:
    """Every field checked against what uses it: images, labels, their count and range."""
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(
            f"{where}: field x: images must be uint8 N x H x W x C with C in (1, 3), got {x.dtype} {tuple(x.shape)}"
        )
    if x.shape[0] == 0 or not MIN_SIDE <= min(x.shape[1:3]) <= max(x.shape[1:3]) <= MAX_SIDE:
        raise DataError(
            f"{where}: field x: need at least one image of {MIN_SIDE}..{MAX_SIDE} pixels a side, got shape "
            f"{tuple(x.shape)}"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{where}: field y: labels must be N integers matching {x.shape[0]} images, got {y.dtype} {tuple(y.shape)}"
        )
    if y.min() < 0:
        raise DataError(f"{where}: field y: labels must be non-negative, found {int(y.min())}")
    top = classes or MAX_CLASSES
    if y.max() >= top:
        what = f"{classes} classes" if classes else f"at most {MAX_CLASSES} classes"
        raise DataError(f"{where}: field y: labels must lie in 0..{top - 1} ({what}), found {int(y.max())}")
    return ArrayDataset(np.ascontiguousarray(x), y.astype(np.int64), where, classes)


def _load_npz(path: Path, keys: tuple[str, str] = ("x", "y")) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {', '.join(missing)} (has {', '.join(f.files)}); "
                    f"{NPZ_LAYOUT.format(split='<split>')}"
                )
            return f[keys[0]], f[keys[1]]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(
            f"{path}: not a readable .npz file ({type(e).__name__}: {e}); re-create it with numpy.savez_compressed"
        ) from None


def _npz_files(root: Path, split: str, prefix: str = "") -> list[Path]:
    exact = root / f"{prefix}{split}.npz"
    if exact.is_file():
        return [exact]
    single = sorted(root.glob(f"{prefix}*_{split}.npz"))
    parts = sorted(root.glob(f"{prefix}*_{split}_part*.npz"))
    return single + parts


def load_npz_dir(root: Path, split: str, prefix: str = "", classes: int = 0) -> ArrayDataset:
    """Load ``split`` from npz file(s) in ``root`` (see the module docstring for names)."""
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; {NPZ_LAYOUT.format(split=split)}")
    files = _npz_files(root, split, prefix)
    if not files:
        raise DataError(f"no {split} data in {root}: {NPZ_LAYOUT.format(split=split)}".replace("{split}", split))
    xs, ys = zip(*(_load_npz(p) for p in files), strict=True)
    try:
        x, y = np.concatenate(xs), np.concatenate(ys)
    except ValueError as e:
        raise DataError(f"{root}: {split} files have inconsistent shapes ({e})") from None
    return _validate(x, y, f"{root}/{files[0].name if len(files) == 1 else prefix + split}", classes)


def load_sample(split: str) -> ArrayDataset:
    """The embedded CIFAR-10 sample (lossless pixels, original order)."""
    ref = resources.files("hw_dq") / "data" / "cifar10_sample.npz"
    with resources.as_file(ref) as path:
        x, y = _load_npz(Path(path), (f"x_{split}", f"y_{split}"))
    return _validate(x, y, f"sample/{split}", NUM_CLASSES)


def _load_cifar10(root: Path, split: str, download: bool) -> ArrayDataset:
    if _npz_files(root, split, "cifar10") if root.is_dir() else []:
        return load_npz_dir(root, split, "cifar10", NUM_CLASSES)
    import torchvision

    # torchvision's CIFAR-10 batches are pickles; torchvision checks each file's MD5
    # against the official release before loading it, so only the genuine files load.
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=download)
    except RuntimeError as e:
        raise DataError(
            f"CIFAR-10 not found in {root} ({e}); pass --data-dir with cifar10_train*.npz and "
            "cifar10_test.npz or torchvision's cifar-10-batches-py, or --download"
        ) from None
    return _validate(np.asarray(ds.data), np.asarray(ds.targets), f"cifar10/{split}", NUM_CLASSES)


def _load_svhn(root: Path, split: str, download: bool) -> ArrayDataset:
    path = root / f"{split}_32x32.mat"
    if download and not path.is_file():
        import torchvision

        torchvision.datasets.SVHN(str(root), split=split, download=True)
    if not path.is_file():
        raise DataError(
            f"SVHN file {path} not found; pass --data-dir with train_32x32.mat and "
            "test_32x32.mat (SVHN format 2) or --download"
        )
    import scipy.io

    # Read the .mat directly (no pickle) so any file in SVHN's format works.
    try:
        mat = scipy.io.loadmat(str(path))
        x = np.transpose(mat["X"], (3, 0, 1, 2))
        y = mat["y"].astype(np.int64).reshape(-1)
    except (KeyError, ValueError, OSError, TypeError, scipy.io.matlab.MatReadError) as e:
        raise DataError(
            f"{path}: not an SVHN format-2 .mat file (needs X: 32x32x3xN uint8, y: N labels; {type(e).__name__}: {e})"
        ) from None
    y[y == 10] = 0  # SVHN stores the digit 0 as label 10
    return _validate(x, y, f"svhn/{split}", NUM_CLASSES)


def load_split(name: str, split: str, data_dir: str | Path | None = None, download: bool = False) -> ArrayDataset:
    """Load one split (``train`` or ``test``) of a dataset as uint8 NHWC + int64 labels."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if name == "sample":
        return load_sample(split)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    root = Path(data_dir) if data_dir is not None else default_data_dir() / name
    if name == "cifar10":
        return _load_cifar10(root, split, download)
    if name == "svhn":
        return _load_svhn(root, split, download)
    if data_dir is None:
        raise DataError("--data npz needs --data-dir pointing to your .npz files")
    return load_npz_dir(root, split)


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator whose seed is a deterministic function of ``parts``."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Pad-``pad`` random crop and horizontal flip of a float NCHW batch (vectorised)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = dx[:, None] + torch.arange(w)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    chan = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chan, rows, cols]


def iterate_batches(
    ds: ArrayDataset,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float NCHW in [0, 1], labels) batches.

    Training order and augmentation depend only on (seed, epoch, step), so a resumed run
    sees exactly the batches an uninterrupted one would, and ``start_step`` skips the
    batches already done. With ``world_size > 1`` every global batch is split across ranks.
    """
    n = len(ds)
    if train:
        order = torch.randperm(n, generator=seeded_generator(seed, epoch))
        steps = n // batch_size
        if steps == 0:
            raise DataError(f"{ds.name}: {n} examples is fewer than one batch of {batch_size}")
    else:
        order = torch.arange(n)
        steps = (n + batch_size - 1) // batch_size
    x_all = torch.from_numpy(ds.x)
    y_all = torch.from_numpy(ds.y)
    for step in range(start_step, steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        idx = idx[rank::world_size]
        xb = to_float(x_all[idx])
        if train:
            xb = augment(xb, seeded_generator(seed, epoch, step, 7919))
        yield xb, y_all[idx]
