"""Datasets that need no download.

Every loader returns a :class:`Dataset` of numpy arrays with a channel-last layout, features
standardized with the training set's statistics:

- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images), images
  ``(N, 8, 8, 1)``; a fixed stratified 80/20 split.
- ``mnist1d`` or ``mnist1d:N``: MNIST-1D (Greydanus 2020) generated on the spot by the
  ``mnist1d`` package's ``make_dataset`` with ``num_samples=N`` (default 5,000; 100 to
  100,000) and the package's default transform settings; signals ``(N, 40, 1)``; its own
  80/20 split.
- ``idx:DIR``: MNIST or Fashion-MNIST in the original IDX format (files may be gzipped),
  ``DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; images ``(N, 28, 28, 1)``.
  :func:`check_name` reads the four files whole before anything trains (headers, sizes,
  gzip integrity, as many labels as images), so a bad file is named up front.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import itertools
import math
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = ["DATASETS", "Dataset", "check_name", "load", "read_idx", "write_idx"]

DATASETS = {
    "digits": "scikit-learn's 8x8 handwritten digits (1,797 images), bundled",
    "mnist1d[:N]": "MNIST-1D generated locally with N samples (default 5000)",
    "idx:DIR": "MNIST / Fashion-MNIST IDX files (optionally .gz) in DIR",
}
MNIST1D_SAMPLES = 5000  # the default N of "mnist1d"
MNIST1D_MIN = 100
# 10x the full suite's 10,000. Generating takes about 0.8 ms a sample on 2 CPU cores (measured:
# 20,000 in 17 s), so about 80 s at this bound, and every run keeps the whole set on each of
# its devices; 100,000,000 would take a day and 16 GB a copy.
MNIST1D_MAX = 100_000
_IDX_STEMS = ("images-idx3-ubyte", "labels-idx1-ubyte")  # after "train-" / "t10k-"


@dataclass(frozen=True)
class Dataset:
    """A classification dataset split into train and test, as float32 / int32 numpy arrays."""

    name: str
    x_train: np.ndarray  # (N_train, *spatial, channels) float32
    y_train: np.ndarray  # (N_train,) int32
    x_test: np.ndarray  # (N_test, *spatial, channels) float32
    y_test: np.ndarray  # (N_test,) int32
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def check_name(name: str) -> tuple[str, str]:
    """Checks that ``name`` names a dataset :func:`load` can load, without loading it (an IDX
    directory must hold the four files); returns its kind and argument, e.g.
    ``("mnist1d", "4000")``, ``("idx", DIR)`` or ``("digits", "")``.

    Raises:
      ValueError: for an unknown name, a sample count out of range, or an IDX directory
        without the four files or with a file that :func:`read_idx` rejects, a non-integer
        or negative label, or label and image counts or image sizes that disagree.
    """
    kind, _, argument = name.partition(":")
    if name == "digits":
        return kind, argument
    if kind == "mnist1d":
        if name != "mnist1d" and not (
            argument.isdigit() and MNIST1D_MIN <= int(argument) <= MNIST1D_MAX
        ):
            raise ValueError(
                f"Expected `dataset` 'mnist1d' or 'mnist1d:N' with an integer N in "
                f"[{MNIST1D_MIN}, {MNIST1D_MAX}] (80% train, 20% test), got {name!r}."
            )
        return kind, argument
    if kind == "idx" and argument:
        paths = _idx_paths(argument)
        _check_idx_files(tuple((path, os.stat(path).st_mtime_ns, os.stat(path).st_size)
                               for path in paths))
        return kind, argument
    raise ValueError(f"Expected `dataset` to be one of {sorted(DATASETS)}, got {name!r}.")


def load(name: str, *, train_size: int | None = None) -> Dataset:
    """Loads a dataset by name (see the module docstring).

    Args:
      name: ``"digits"``, ``"mnist1d"``, ``"mnist1d:N"`` or ``"idx:DIR"``.
      train_size: if given, keep only the first ``train_size`` training examples (the data
        are already shuffled), e.g. to study overfitting on a small training set.

    Raises:
      ValueError: for a name :func:`check_name` rejects or a ``train_size`` larger than the
        training set.
    """
    kind, argument = check_name(name)
    if kind == "digits":
        dataset = _digits()
    elif kind == "mnist1d":
        dataset = _mnist1d(int(argument or MNIST1D_SAMPLES))
    else:
        dataset = _idx(argument)
    if train_size is not None:
        if not 0 < train_size <= len(dataset.y_train):
            raise ValueError(
                f"Expected `train_size` in [1, {len(dataset.y_train)}] for {name!r}, "
                f"got {train_size}."
            )
        dataset = Dataset(
            name=f"{dataset.name}[:{train_size}]",
            x_train=dataset.x_train[:train_size],
            y_train=dataset.y_train[:train_size],
            x_test=dataset.x_test,
            y_test=dataset.y_test,
            num_classes=dataset.num_classes,
        )
    return dataset


def _standardized(name, x_train, y_train, x_test, y_test, num_classes) -> Dataset:
    mean = x_train.mean()
    std = x_train.std() + 1e-8
    return Dataset(
        name=name,
        x_train=((x_train - mean) / std).astype(np.float32),
        y_train=y_train.astype(np.int32),
        x_test=((x_test - mean) / std).astype(np.float32),
        y_test=y_test.astype(np.int32),
        num_classes=num_classes,
    )


def _digits_file() -> str | None:
    """The file scikit-learn ships the digits in (``sklearn/datasets/data/digits.csv.gz``: a
    row per image, its 64 pixels then its label), found without importing scikit-learn,
    which takes seconds (scipy and more) for 1,797 rows; None where it is not there."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            return path
    return None


def _digits() -> Dataset:
    path = _digits_file()
    if path is None:  # another layout: scikit-learn's own loader
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, y = bunch.images, bunch.target
    else:  # what load_digits does with the file
        table = np.loadtxt(path, delimiter=",")
        images, y = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
    x = images.astype(np.float64)[..., None]
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return _standardized("digits", x[:split], y[:split], x[split:], y[split:], 10)


def _mnist1d(num_samples: int) -> Dataset:
    # The generator, never the package's download path (get_dataset may fetch a pickle).
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    state = np.random.get_state()  # make_dataset reseeds numpy's global generator
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(state)
    return _standardized(
        f"mnist1d:{num_samples}",
        raw["x"][..., None],
        raw["y"],
        raw["x_test"][..., None],
        raw["y_test"],
        10,
    )


def _find(directory: str, stem: str) -> str:
    alt = stem.replace("-idx", ".idx")  # some mirrors use train-images.idx3-ubyte
    for candidate in (stem, stem + ".gz", alt, alt + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Expected {stem} or {stem}.gz in {directory!r} for `--dataset idx:DIR`; "
        f"found {sorted(os.listdir(directory)) if os.path.isdir(directory) else 'no directory'}."
    )


def _idx_paths(directory: str) -> tuple[str, ...]:
    """The train images, train labels, test images and test labels files in ``directory``.

    Raises:
      ValueError: naming the first file that is missing.
    """
    try:
        return tuple(
            _find(directory, f"{prefix}-{stem}")
            for prefix, stem in itertools.product(("train", "t10k"), _IDX_STEMS)
        )
    except FileNotFoundError as error:
        raise ValueError(str(error)) from None


def _idx_arrays(paths: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """The four arrays of :func:`_idx_paths`, checked to make one dataset.

    Raises:
      ValueError: naming the file that is not an IDX file of the expected rank, that holds a
        non-integer or negative label, or whose count or image size disagrees with another's.
    """
    arrays = tuple(read_idx(path) for path in paths)
    for path, array in zip(paths, arrays, strict=True):
        rank = 3 if "images" in os.path.basename(path) else 1
        if array.ndim != rank or 0 in array.shape:
            raise ValueError(
                f"Expected {rank} non-zero dimensions in {path!r} ("
                f"{'N, height, width' if rank == 3 else 'N'}), got shape {array.shape}."
            )
    for images, labels, image_path, label_path in ((0, 1, *paths[:2]), (2, 3, *paths[2:])):
        if len(arrays[labels]) != len(arrays[images]):
            raise ValueError(
                f"Expected as many labels in {label_path!r} as images in {image_path!r} "
                f"({len(arrays[images])}), got {len(arrays[labels])}."
            )
        if arrays[labels].dtype.kind not in "iu" or arrays[labels].min() < 0:
            raise ValueError(
                f"Expected integer labels >= 0 in {label_path!r}, got {arrays[labels].dtype} "
                f"values from {arrays[labels].min()}."
            )
    if arrays[0].shape[1:] != arrays[2].shape[1:]:
        raise ValueError(
            f"Expected images of the same size in {paths[0]!r} and {paths[2]!r}, got "
            f"{arrays[0].shape[1:]} and {arrays[2].shape[1:]}."
        )
    return arrays


@functools.lru_cache(maxsize=8)
def _check_idx_files(files: tuple[tuple[str, int, int], ...]) -> None:
    """:func:`_idx_arrays` on the four files, once per set of (path, modification time, size):
    the command line checks a dataset name several times before it is loaded."""
    _idx_arrays(tuple(path for path, _, _ in files))


def _idx(directory: str) -> Dataset:
    x_train, y_train, x_test, y_test = _idx_arrays(_idx_paths(directory))
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return _standardized(
        f"idx:{os.path.basename(os.path.normpath(directory))}",
        x_train.astype(np.float64)[..., None],
        y_train,
        x_test.astype(np.float64)[..., None],
        y_test,
        num_classes,
    )


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (``.gz`` allowed): magic ``00 00 TYPE NDIM``, big-endian dims, data.

    Raises:
      ValueError: naming ``path`` if it cannot be read, is not a whole gzip stream (``.gz``),
        has no IDX header, or holds more or fewer bytes than its header's shape.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        kind = "a whole gzip file" if path.endswith(".gz") else "a readable file"
        raise ValueError(f"Expected {kind} at {path!r}, got: {error}.") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"Expected an IDX file at {path!r} (magic 00 00, a type code among "
            f"{', '.join(f'{code:02x}' for code in _IDX_DTYPES)}, the rank), got "
            f"{'the bytes ' + data[:4].hex(' ') if data else 'an empty file'}."
        )
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(
            f"Expected {offset} header bytes in {path!r} (rank {ndim}), got {len(data)}: the "
            "file is truncated."
        )
    shape = struct.unpack(f">{ndim}I", data[4:offset])
    dtype = _IDX_DTYPES[data[2]]
    expected = offset + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"Expected {expected} bytes in {path!r} (shape {shape} of {dtype.name}), got "
            f"{len(data)}: the file is {'truncated' if len(data) < expected else 'too long'}."
        )
    array = np.frombuffer(data, dtype=dtype, offset=offset)
    return array.reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes ``array`` (uint8) as an IDX file, gzipped if ``path`` ends in ``.gz``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
