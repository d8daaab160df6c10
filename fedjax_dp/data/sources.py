"""Data sources: TensorFlow Datasets, FedProx's Synthetic(alpha, beta), user tables and folders.

Everything here runs on the host with numpy and returns the same shapes as
:func:`fedjax_dp.load_digits` (arrays) or a :class:`~fedjax_dp.FederatedData`. Random data
comes from ``np.random.default_rng(seed)``, never from numpy's global generator.

TensorFlow Datasets is imported lazily, inside :func:`load_tfds`: ``import fedjax_dp`` does not
import it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from fedjax_dp.data import FederatedData, _check_int, _is_real, _labels_as_int, from_arrays

# The datasets documented and tested; any TFDS image-classification dataset with an
# ``image``/``label`` pair (its supervised keys) loads the same way.
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "emnist")

TABLE_SUFFIXES = (".csv", ".npz")

Arrays = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class DataNotFoundError(FileNotFoundError):
    """A dataset is not where it was looked for and could not be fetched."""


# ----------------------------------------------------------------------------- TFDS


def load_tfds(
    name: str,
    *,
    data_dir: str | None = None,
    split: str = "train",
    test_split: str = "test",
    download: bool = True,
) -> Arrays:
    """Loads a TensorFlow Datasets image-classification dataset as numpy arrays.

    Reads through ``tfds.data_source`` (random access to ArrayRecord files), which works
    without TensorFlow. Each example is decoded once (PNG decoding with Pillow) into one
    array; there is no ``tf.data`` pipeline.

    Where the data comes from: ``data_dir/<name>/<version>`` (``data_dir=None``: TFDS's
    default, ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``) must hold the dataset prepared
    in the ``array_record`` file format. If it does not and ``download`` is true, TFDS
    downloads and prepares it there. Preparing needs network access and, in
    tensorflow-datasets 4.9, TensorFlow (TFDS encodes images with it while writing; reading
    does not need it). Without TensorFlow, prepare once on any machine that has it::

        pip install tensorflow tensorflow-datasets
        tfds build mnist --file_format=array_record --data_dir=/path/to/tfds_data

    and pass ``data_dir="/path/to/tfds_data"``. EMNIST in TFDS has no writer ids, so it has
    no natural clients; partition it with :func:`fedjax_dp.partition` (for writer-level
    EMNIST export per-writer files and use :func:`from_folder`).

    Args:
      name: a TFDS name: ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"emnist"``
        (``"emnist/byclass"``, 62 classes) or ``"emnist/<config>"`` (``bymerge``,
        ``balanced``, ``letters``, ``digits``, ``mnist``); a version suffix such as
        ``"mnist:3.0.1"`` is accepted.
      data_dir: the root folder of prepared TFDS data; ``None`` or ``""``: TFDS's default.
      split: the split for the clients (TFDS split syntax, e.g. ``"train"`` or
        ``"train[:10%]"``).
      test_split: the split for evaluation (e.g. ``"test"``).
      download: whether to download and prepare the dataset when it is missing.

    Returns:
      ``((x, y), (x_test, y_test))``: ``x`` float32 ``[N, H, W, C]`` scaled to ``[0, 1]``,
      ``y`` int32 ``[N]`` in ``[0, num_classes)``.

    Raises:
      DataNotFoundError: the dataset is not prepared in ``data_dir`` (in the array_record
        format) and could not be downloaded and prepared; the message names the dataset, the
        folder and the fixes.
      ValueError: an unknown dataset, config or split, or a dataset without an image and a
        class label.
      ImportError: tensorflow-datasets or array_record is not installed.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} must be a TFDS dataset name, e.g. 'mnist'")
    tfds = _import_tfds()
    data_dir = data_dir or None
    where = f"data_dir={data_dir!r}" if data_dir else "TFDS's default data_dir"
    builder = _tfds_builder(tfds, name, data_dir)
    image_key, label_key, shape = _image_label_features(tfds, builder, name)
    with _quiet_absl():
        prepared = builder.is_prepared()
    if prepared:
        fmt = builder.info.file_format
        random_access = tfds.core.file_adapters.FileFormat.with_random_access()
        if fmt is not None and fmt not in random_access:
            raise DataNotFoundError(
                f"TFDS dataset {name!r} is prepared in {builder.data_dir} in the "
                f"{fmt.value} format, but tfds.data_source needs array_record: convert it with "
                f"`tfds convert_format --dataset_version_dir={builder.data_dir} "
                "--out_file_format=array_record` (needs TensorFlow), or point data_dir at a "
                "copy prepared with --file_format=array_record"
            )
    else:
        _prepare(tfds, name, data_dir, where, download)
    try:
        train_source, test_source = tfds.data_source(
            name,
            split=[split, test_split],
            data_dir=data_dir,
            download=False,
            builder_kwargs={"file_format": "array_record"},
        )
    except ValueError as e:  # e.g. an unknown split
        raise ValueError(f"TFDS dataset {name!r}: {_first_line(e)}") from None
    return (
        _decode_all(train_source, image_key, label_key, shape),
        _decode_all(test_source, image_key, label_key, shape),
    )


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"source 'tfds' needs tensorflow-datasets and array_record ({e}); "
            "pip install tensorflow-datasets array_record"
        ) from None
    return tfds


def _tensorflow_installed() -> bool:
    """Whether TensorFlow can be imported (TFDS needs it to prepare image datasets)."""
    return importlib.util.find_spec("tensorflow") is not None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _quiet_absl():
    """Hides absl warnings (TFDS logs one for every missing folder it looks in)."""
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


def _tfds_builder(tfds, name: str, data_dir: str | None, **kwargs):
    try:
        with _quiet_absl():
            return tfds.builder(name, data_dir=data_dir, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"TFDS has no dataset {name!r}; use one of {', '.join(TFDS_DATASETS)} "
            "(or another TFDS image-classification dataset)"
        ) from None
    except ValueError as e:  # e.g. an unknown config: emnist/foo
        raise ValueError(f"TFDS dataset {name!r}: {_first_line(e)}") from None


def _image_label_features(tfds, builder, name: str):
    features = builder.info.features
    keys = builder.info.supervised_keys or ("image", "label")
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
        keys = ("image", "label")
    image_key, label_key = keys
    by_key = dict(features.items())
    image, label = by_key.get(image_key), by_key.get(label_key)
    if not isinstance(image, tfds.features.Image) or not isinstance(
        label, tfds.features.ClassLabel
    ):
        raise ValueError(  # noqa: TRY004 - the dataset's content, not an argument's type
            f"TFDS dataset {name!r} is not an image-classification dataset (an Image feature "
            f"and a ClassLabel); supported: {', '.join(TFDS_DATASETS)}"
        )
    shape = tuple(image.shape)
    if any(d is None for d in shape):
        raise ValueError(
            f"TFDS dataset {name!r} has images of varying shape {shape}; only fixed-size "
            "images are supported"
        )
    return image_key, label_key, shape


def _prepare(tfds, name: str, data_dir: str | None, where: str, download: bool) -> None:
    """Downloads and prepares ``name`` as array_record, or raises a :class:`DataNotFoundError`."""
    builder = _tfds_builder(tfds, name, data_dir, file_format="array_record")
    missing = f"TFDS dataset {name!r} is not prepared in {builder.data_dir} ({where})"
    fix = (
        f"on a machine with network access and TensorFlow run `tfds build {name} "
        "--file_format=array_record --data_dir=DIR` and set data_dir=DIR (data.data_dir in a "
        "config)"
    )
    if not download:
        raise DataNotFoundError(
            f"{missing} and download=False; either allow the download, or {fix}"
        )
    if not _tensorflow_installed():
        raise DataNotFoundError(
            f"{missing}, and TFDS needs TensorFlow to prepare it (reading prepared data does "
            f"not): `pip install tensorflow` and rerun with network access, or {fix}"
        )
    try:
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - any failure to fetch is reported as one line
        raise DataNotFoundError(
            f"{missing} and could not be downloaded and prepared ({type(e).__name__}: "
            f"{_first_line(e)}); check network access, or {fix}"
        ) from None


def _decode_all(source, image_key: str, label_key: str, shape: tuple) -> tuple:
    """Decodes every example of a TFDS data source into ``(f32[N, *shape], i32[N])``."""
    n = len(source)
    images = np.empty((n, *shape), np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):  # one PNG decode per record (random-access reads)
        example = source[i]
        images[i] = example[image_key]
        labels[i] = example[label_key]
    x = images.astype(np.float32)
    x *= np.float32(1.0 / 255.0)
    return x, labels.astype(np.int32)


# ----------------------------------------------------------------------------- FedProx


class SyntheticData(NamedTuple):
    """FedProx Synthetic(alpha, beta): per-device train and test sets.

    Attributes:
      train: the devices' training examples; clients are the devices, named ``f_00000``,
        ``f_00001``, ... as in the reference code.
      test: each device's held-out examples, same devices in the same order. ``test.x`` and
        ``test.y`` are the union of the device test sets, on which the FedProx paper
        evaluates.
      weights: ``f64[K, d, c]``, each device's ``W_k`` (read-only broadcast of the shared one
        for ``iid=True``).
      biases: ``f64[K, c]``, each device's ``b_k``.
      input_means: ``f64[K, d]``, each device's ``v_k``.
    """

    train: FederatedData
    test: FederatedData
    weights: np.ndarray
    biases: np.ndarray
    input_means: np.ndarray


_SYNTHETIC_CHUNK = 8192  # rows per block when computing labels with per-device weights


def fedprox_synthetic(
    alpha: float,
    beta: float,
    *,
    num_devices: int = 30,
    iid: bool = False,
    seed: int = 0,
    num_features: int = 60,
    num_classes: int = 10,
    train_fraction: float = 0.9,
) -> SyntheticData:
    """The Synthetic(alpha, beta) benchmark of FedProx (Li et al., 2020), as its code makes it.

    For each device ``k`` (the reference's ``data/synthetic_*/generate_synthetic.py``):

    * ``n_k = int(lognormal(4, 2)) + 50`` examples;
    * ``u_k ~ N(0, alpha)`` and ``B_k ~ N(0, beta)``, where the second argument is the
      STANDARD DEVIATION (numpy's ``scale``, as in the code; the paper writes variances);
    * ``W_k ~ N(u_k, 1)`` (``[d, c]``) and ``b_k ~ N(u_k, 1)`` (``[c]``), with the same
      ``u_k`` for both;
    * ``v_k ~ N(B_k, 1)`` (``[d]``) and ``x ~ N(v_k, Sigma)`` with ``Sigma`` diagonal,
      ``Sigma_jj = j^-1.2`` for ``j = 1..d``;
    * ``y = argmax(softmax(x W_k + b_k)) = argmax(x W_k + b_k)``;
    * the first ``int(train_fraction * n_k)`` examples are for training, the rest for testing.

    ``iid=True`` is the reference's IID variant: one ``W, b ~ N(0, 1)`` for all devices and
    ``v_k = B_k * ones`` (zeros for ``beta=0``, the paper's Synthetic-IID).

    Differences from the reference, none of which changes the distribution: numpy's
    ``default_rng(seed)`` instead of the unseeded global generator (so the values differ but
    are reproducible); ``x`` drawn as ``v_k + sqrt(Sigma_jj) z`` instead of
    ``multivariate_normal``; no shuffle before the split (examples within a device are
    i.i.d.); ``x`` stored as float32. Note that ``u_k`` shifts every entry of ``W_k`` and
    ``b_k`` by the same amount, which adds the same value to every class's logit: ``alpha``
    never changes a label, in the reference as here. Heterogeneity across devices comes from
    the independent ``W_k`` (for any ``alpha``) and from ``beta`` through the inputs.

    Args:
      alpha: the spread of the devices' models, ``>= 0`` (the paper: 0, 0.5, 1).
      beta: the spread of the devices' input means, ``>= 0``.
      num_devices: the number of devices (clients), ``>= 1``; thousands are fine (memory is
        about ``450 * num_devices * num_features * 4`` bytes on average).
      iid: the IID variant (``alpha`` unused).
      seed: seed of the generator; the data is a deterministic function of the arguments.
      num_features: ``d`` (the paper: 60).
      num_classes: ``c`` (the paper: 10).
      train_fraction: fraction of each device's examples for training (the paper: 0.9).

    Returns:
      A :class:`SyntheticData`: ``train`` and ``test`` (every device has at least one example
      in each; ``x`` is float32 ``[n, d]``, ``y`` int32) and the devices' true parameters.

    Raises:
      ValueError: on invalid arguments.

    References:
      Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. Federated Optimization in Heterogeneous
      Networks. MLSys 2020. https://arxiv.org/abs/1812.06127
    """
    for arg, value in (("alpha", alpha), ("beta", beta)):
        if not (_is_real(value) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{arg}={value!r} must be a finite number >= 0, e.g. 0, 0.5 or 1")
    num_devices = _check_int("num_devices", num_devices, 1, "pass a positive number of devices")
    num_features = _check_int("num_features", num_features, 1, "the paper uses 60")
    num_classes = _check_int("num_classes", num_classes, 2, "the paper uses 10")
    if not (_is_real(train_fraction) and 0.02 <= train_fraction < 1):
        raise ValueError(
            f"train_fraction={train_fraction!r} must be in [0.02, 1) so that every device "
            "keeps a training and a test example; the paper uses 0.9"
        )
    rng = np.random.default_rng(seed)
    d, c, k = num_features, num_classes, num_devices
    # Draw order follows the reference: sizes, u, B, input means, then per-device W and b.
    sizes = rng.lognormal(4.0, 2.0, k).astype(np.int64) + 50
    u = rng.normal(0.0, float(alpha), k)
    big_b = rng.normal(0.0, float(beta), k)
    if iid:
        means = np.repeat(big_b[:, None], d, axis=1)
        w = rng.standard_normal((1, d, c))
        b = rng.standard_normal((1, c))
    else:
        means = big_b[:, None] + rng.standard_normal((k, d))
        w = u[:, None, None] + rng.standard_normal((k, d, c))
        b = u[:, None] + rng.standard_normal((k, c))
    std = np.arange(1, d + 1, dtype=np.float64) ** -0.6  # sqrt(Sigma_jj), Sigma_jj = j^-1.2

    total = int(sizes.sum())
    device = np.repeat(np.arange(k), sizes)
    x = rng.standard_normal((total, d), dtype=np.float32)
    y = np.empty(total, np.int32)
    for start in range(0, total, _SYNTHETIC_CHUNK):  # vectorised in blocks of rows
        rows = slice(start, min(start + _SYNTHETIC_CHUNK, total))
        dev = device[rows]
        xb = means[dev] + x[rows] * std  # float64 [rows, d]
        x[rows] = xb
        if iid:
            logits = xb @ w[0] + b[0]
        else:
            logits = np.einsum("nd,ndc->nc", xb, w[dev]) + b[dev]
        y[rows] = np.argmax(logits, axis=1)

    num_train = (train_fraction * sizes).astype(np.int64)  # int(0.9 * n), as the reference
    position = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    is_train = position < np.repeat(num_train, sizes)
    names = tuple(f"f_{i:05d}" for i in range(k))

    def federated(mask: np.ndarray, counts: np.ndarray) -> FederatedData:
        counts = counts.astype(np.int32)
        return FederatedData(
            x=x[mask],
            y=y[mask],
            offsets=(np.cumsum(counts) - counts).astype(np.int32),
            counts=counts,
            num_classes=num_classes,
            max_count=int(counts.max()),
            client_names=names,
        )

    return SyntheticData(
        train=federated(is_train, num_train),
        test=federated(~is_train, sizes - num_train),
        weights=np.broadcast_to(w, (k, d, c)),
        biases=np.broadcast_to(b, (k, c)),
        input_means=means,
    )


# ----------------------------------------------------------------------------- tables


def from_table(
    table: Any,
    *,
    client_column: str,
    label_column: str,
    feature_columns: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> FederatedData:
    """Builds a :class:`~fedjax_dp.FederatedData` from a table with a client-id column.

    The table has one row per example: a client-id column (the natural clients, e.g. a
    writer or a user), a label column and feature columns.

    Args:
      table: one of

        * a path to a ``.csv`` file with a header row (comma separated, ``"`` quotes); feature
          columns must be numeric, client ids may be strings;
        * a path to a ``.npz`` file whose arrays are the columns (``[N]`` each, or ``[N, ...]``
          for a multi-dimensional feature such as an image);
        * a mapping ``name -> array`` (a dict of numpy arrays, or a pandas DataFrame);
        * a numpy structured array.
      client_column: the name of the client-id column (ints or strings).
      label_column: the name of the integer label column.
      feature_columns: the feature columns, in order; default: every other column, in table
        order. One ``[N, ...]`` column keeps its shape; several columns are flattened and
        concatenated into ``[N, F]``.
      num_classes: the number of classes; default ``max(label) + 1``.

    Returns:
      The dataset grouped by client (as :func:`fedjax_dp.from_arrays`), with
      ``client_names`` the sorted unique client ids.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: a missing column (the message lists the table's columns), no feature
        column, non-numeric features, mismatched column lengths or invalid labels.
    """
    columns, where = _read_table(table)
    x, y, ids = _split_columns(
        columns,
        where,
        client_column=client_column,
        label_column=label_column,
        feature_columns=feature_columns,
    )
    try:
        return from_arrays(x, y, ids, num_classes=num_classes)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def from_folder(
    path: str | pathlib.Path,
    *,
    label_column: str = "y",
    feature_columns: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> FederatedData:
    """Builds a :class:`~fedjax_dp.FederatedData` from a folder of per-client files.

    Each ``.csv`` or ``.npz`` file in ``path`` (not its subfolders; other files are ignored)
    holds one client's examples as a table (see :func:`from_table`, without a client
    column); the file name without its suffix is the client's name. For ``.npz`` files the
    defaults fit ``np.savez(f"{client}.npz", x=x_k, y=y_k)``.

    Args:
      path: the folder.
      label_column: the label column (``.npz``: the label array), default ``"y"``.
      feature_columns: the feature columns; default: every other column (see
        :func:`from_table`).
      num_classes: the number of classes; default ``max(label) + 1`` over all clients.

    Returns:
      The dataset; ``client_names`` are the file names without suffix, sorted.

    Raises:
      FileNotFoundError: ``path`` is not a folder.
      ValueError: no ``.csv``/``.npz`` file, a file without examples, two files with the
        same client name, a missing column or feature shapes that differ between files (the
        message names the file).
    """
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} not found (per-client files expected)")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise ValueError(
            f"folder {str(folder)!r} holds no .csv or .npz file; put one file per client "
            "there, named after the client (e.g. alice.npz with arrays x and y)"
        )
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise ValueError(
            f"folder {str(folder)!r}: clients {dup} have more than one file (e.g. both .csv "
            "and .npz); keep one file per client"
        )
    xs, ys = [], []
    for p in files:
        columns, where = _read_table(p)
        x, y, _ = _split_columns(
            columns, where, client_column=None, label_column=label_column,
            feature_columns=feature_columns,
        )  # fmt: skip
        if len(y) == 0:
            raise ValueError(f"{where} has no examples; every client file needs at least one")
        y = _labels_as_int(np.asarray(y), f"{where}: column {label_column!r}")
        if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            raise ValueError(f"{where} contains non-finite features (nan or inf)")
        xs.append(x)
        ys.append(y)
    shapes = [x.shape[1:] for x in xs]
    common = max(set(shapes), key=shapes.count)  # the shape most files have
    odd = [i for i, shape in enumerate(shapes) if shape != common]
    if odd:
        i, example = odd[0], shapes.index(common)
        raise ValueError(
            f"{files[i].name} has examples of shape {shapes[i]}, but {shapes.count(common)} of "
            f"the {len(files)} client files (e.g. {files[example].name}) have {common}; every "
            "client's features must have the same shape"
        )
    ids = np.repeat(np.array(stems), [len(y) for y in ys])
    try:
        return from_arrays(np.concatenate(xs), np.concatenate(ys), ids, num_classes=num_classes)
    except ValueError as e:
        raise ValueError(f"folder {str(folder)!r}: {e}") from None


def _read_table(table: Any) -> tuple[dict[str, np.ndarray], str]:
    """``({column: array}, description for messages)`` of a ``.csv``/``.npz`` file, mapping
    or structured array. CSV columns that all parse as numbers become float64 (int64 when
    all integral); others stay strings."""
    if isinstance(table, (str, pathlib.Path)):
        p = pathlib.Path(table)
        if not p.is_file():
            raise FileNotFoundError(f"table file {str(p)!r} not found")
        suffix = p.suffix.lower()
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}, p.name
        if suffix == ".csv":
            return _read_csv(p), p.name
        raise ValueError(f"table file {str(p)!r} must end in .csv or .npz")
    if isinstance(table, np.ndarray) and table.dtype.names:
        return {n: np.asarray(table[n]) for n in table.dtype.names}, "table"
    if isinstance(table, Mapping) or hasattr(table, "keys"):
        return {str(k): np.asarray(table[k]) for k in table}, "table"
    raise ValueError(
        f"table of type {type(table).__name__} is not supported; pass a .csv/.npz path, a "
        "dict of arrays, a DataFrame or a structured array"
    )


def _read_csv(path: pathlib.Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        header = f.readline()
    names = [h.strip().strip('"') for h in header.rstrip("\r\n").split(",")]
    if not header.strip() or any(not n for n in names):
        raise ValueError(
            f"{path.name}: the first line must be a header of column names, got {header!r}"
        )
    try:
        cells = np.loadtxt(
            path, delimiter=",", dtype=str, skiprows=1, quotechar='"', ndmin=2, encoding="utf-8"
        )
    except ValueError as e:
        raise ValueError(f"{path.name}: not a rectangular CSV table ({e})") from None
    if cells.size and cells.shape[1] != len(names):
        raise ValueError(
            f"{path.name}: rows have {cells.shape[1]} fields but the header names "
            f"{len(names)} columns"
        )
    cells = cells.reshape(-1, len(names))
    return {name: _parse_column(cells[:, j]) for j, name in enumerate(names)}


def _parse_column(cells: np.ndarray) -> np.ndarray:
    cells = np.char.strip(cells)
    try:
        values = cells.astype(np.float64)
    except ValueError:
        return cells  # strings (e.g. client ids)
    integral = np.all(np.isfinite(values)) and np.all(values == np.round(values))
    if values.size and integral and np.all(np.abs(values) < 2**53):
        return values.astype(np.int64)
    return values


def _split_columns(
    columns: dict[str, np.ndarray],
    where: str,
    *,
    client_column: str | None,
    label_column: str,
    feature_columns: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(x, y, client_ids)`` from named columns, with errors that name the table."""
    available = list(columns)
    needed = [c for c in (client_column, label_column) if c is not None]
    if feature_columns is not None:
        if isinstance(feature_columns, str):
            feature_columns = [feature_columns]
        needed += list(feature_columns)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(
            f"{where} has no column {', '.join(map(repr, missing))}; its columns are {available}"
        )
    if feature_columns is None:
        feature_columns = [c for c in available if c not in (client_column, label_column)]
    if not feature_columns:
        raise ValueError(
            f"{where} has no feature column besides {needed}; its columns are {available}"
        )
    n = len(columns[label_column])
    for c in [*needed, *feature_columns]:
        if columns[c].ndim == 0 or len(columns[c]) != n:
            raise ValueError(
                f"{where}: column {c!r} has {columns[c].shape} entries but {label_column!r} "
                f"has {n}; every column needs one entry per example"
            )
    for c in feature_columns:
        if columns[c].dtype.kind not in "biuf":
            raise ValueError(
                f"{where}: feature column {c!r} is not numeric (dtype {columns[c].dtype}); "
                "pass feature_columns to choose numeric columns"
            )
    if len(feature_columns) == 1:
        x = columns[feature_columns[0]]
        if x.ndim == 1:
            x = x[:, None]
    else:
        x = np.concatenate([columns[c].reshape(n, -1) for c in feature_columns], axis=1)
    y = columns[label_column]
    ids = columns[client_column] if client_column is not None else None
    if ids is not None and ids.ndim != 1:
        raise ValueError(f"{where}: client column {client_column!r} must be 1-D")
    return x, y, ids
