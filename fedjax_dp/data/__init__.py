"""Federated datasets as flat arrays, client partitioning and small built-in datasets.

Everything here runs on the host with numpy. A :class:`FederatedData` stores all examples in
one array, grouped by client, plus per-client ``offsets`` and ``counts``; it is a pytree, so it
can be moved to the device with :meth:`FederatedData.to_device` and passed to jitted functions.

Randomness never uses numpy's global generator: every random function takes ``seed: int`` and
draws from ``np.random.default_rng(seed)``, so results are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax
import jax
import numpy as np

Array = Any  # np.ndarray on the host, jax.Array after `to_device`.

PARTITION_METHODS = ("iid", "dirichlet", "shards", "quantity_skew")

_DIRICHLET_MAX_TRIES = 1000


class ClientTable:
    """Static facts of flat per-client arrays ``x``, ``y``, ``counts`` (shared by the device
    :class:`FederatedData` and the host :class:`~fedjax_dp.population.HostPopulation`)."""

    x: Array
    counts: Array

    @property
    def num_clients(self) -> int:
        """The number of clients ``K``."""
        return int(self.counts.shape[0])

    @property
    def num_examples(self) -> int:
        """The total number of examples ``N``."""
        return int(self.x.shape[0])

    @property
    def feature_shape(self) -> tuple:
        """The shape of one example, ``x.shape[1:]``."""
        return tuple(self.x.shape[1:])


@flax.struct.dataclass
class FederatedData(ClientTable):
    """A federated dataset as flat arrays.

    Client ``k`` owns examples ``x[offsets[k]:offsets[k] + counts[k]]`` (and the same rows of
    ``y``). Clients are stored contiguously and in order, and every client has at least one
    example.

    Attributes:
      x: ``[N, *feature_shape]`` float32 features.
      y: ``[N]`` int32 labels in ``[0, num_classes)``.
      offsets: ``[K]`` int32, the first row of each client's block.
      counts: ``[K]`` int32, the number of examples of each client (all ``>= 1``).
      num_classes: the number of label classes (static).
      max_count: ``max(counts)`` as a static Python int.
      client_names: optional original id of each client (static), in storage order; ``None``
        means the clients are simply ``0 .. K-1``.
    """

    x: Array
    y: Array
    offsets: Array
    counts: Array
    num_classes: int = flax.struct.field(pytree_node=False)
    max_count: int = flax.struct.field(pytree_node=False)
    client_names: tuple | None = flax.struct.field(pytree_node=False, default=None)

    def client(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns host copies ``(x_k, y_k)`` of client ``k``'s examples.

        Args:
          k: the client index, in ``[0, num_clients)``.

        Returns:
          ``(x_k, y_k)`` as numpy arrays with ``counts[k]`` rows.

        Raises:
          ValueError: if ``k`` is out of range.
        """
        if not 0 <= int(k) < self.num_clients:
            raise ValueError(
                f"k={k} is not a client index; use 0 <= k < num_clients={self.num_clients}"
            )
        start = int(self.offsets[k])
        stop = start + int(self.counts[k])
        return np.array(self.x[start:stop]), np.array(self.y[start:stop])

    def to_device(self) -> FederatedData:
        """Returns the same dataset with its arrays placed on the default JAX device."""
        return self.replace(
            x=jax.device_put(self.x),
            y=jax.device_put(self.y),
            offsets=jax.device_put(self.offsets),
            counts=jax.device_put(self.counts),
        )


# ----------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, minimum: int, hint: str) -> int:
    """Returns ``value`` as an int, or raises if it is not an integer ``>= minimum``."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}; {hint}")
    return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _labels_as_int(y: np.ndarray, name: str = "y") -> np.ndarray:
    """Returns integer-valued labels ``y`` as int64, or raises a ValueError."""
    if y.dtype.kind in "iu":
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            raise ValueError(f"{name} contains non-finite labels; labels must be integers")
        if not np.all(y == np.round(y)):
            bad = y[y != np.round(y)][0]
            raise ValueError(
                f"{name} must hold integer class labels but contains {bad!r}; "
                "pass integer labels in [0, num_classes)"
            )
        return y.astype(np.int64)
    raise ValueError(f"{name} has dtype {y.dtype}; pass integer class labels in [0, num_classes)")


# ----------------------------------------------------------------------------- construction


def from_arrays(
    x: Array,
    y: Array,
    client_ids: Array,
    *,
    num_classes: int | None = None,
    dtype: Any = np.float32,
) -> FederatedData:
    """Builds a :class:`FederatedData` from per-example arrays and client ids.

    The clients are the sorted unique ``client_ids``; examples are grouped by client with a
    stable sort, so the order of examples within a client is preserved.

    Args:
      x: ``[N, *feature_shape]`` features (any real dtype; all values must be finite).
      y: ``[N]`` integer class labels (integral floats such as ``1.0`` are accepted).
      client_ids: ``[N]`` client id of each example (ints or strings).
      num_classes: the number of classes; defaults to ``max(y) + 1``. Must be ``>= 2``.
      dtype: the floating dtype to store ``x`` in.

    Returns:
      The grouped dataset, with host numpy arrays and ``client_names`` set to the sorted unique
      ids.

    Raises:
      ValueError: on mismatched lengths, no examples, non-integer or out-of-range labels,
        non-finite features, unsortable client ids or ``num_classes < 2``.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    client_ids = np.asarray(client_ids)
    if x.ndim < 1:
        raise ValueError(f"x must have shape [N, *feature_shape]; got a scalar of shape {x.shape}")
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D with one label per example; got shape {y.shape}")
    if client_ids.ndim != 1:
        raise ValueError(
            f"client_ids must be 1-D with one id per example; got shape {client_ids.shape}"
        )
    if not len(x) == len(y) == len(client_ids):
        raise ValueError(
            "x, y and client_ids must have the same length (one entry per example); got "
            f"len(x)={len(x)}, len(y)={len(y)}, len(client_ids)={len(client_ids)}"
        )
    if len(x) == 0:
        raise ValueError("x has no examples; pass at least one example")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"x has dtype {x.dtype}; pass real-valued features")
    labels = _labels_as_int(y, "y")

    if num_classes is None:
        num_classes = int(labels.max()) + 1
        if num_classes < 2:
            raise ValueError(
                f"num_classes={num_classes} (inferred as max(y)+1) must be >= 2; pass "
                "num_classes explicitly when the data holds a single class"
            )
    else:
        num_classes = _check_int(
            "num_classes", num_classes, 2, "pass the number of label classes (at least 2)"
        )
    if labels.min() < 0:
        raise ValueError(
            f"y contains the label {int(labels.min())} < 0; labels must lie in "
            f"[0, num_classes={num_classes})"
        )
    if labels.max() >= num_classes:
        raise ValueError(
            f"y contains the label {int(labels.max())} >= num_classes={num_classes}; labels "
            f"must lie in [0, num_classes), pass a larger num_classes or remap the labels"
        )

    x = x.astype(dtype, copy=False)
    if not np.all(np.isfinite(x)):
        raise ValueError("x contains non-finite values (nan or inf); clean or impute them first")

    try:
        names, inverse = np.unique(client_ids, return_inverse=True)
    except TypeError as e:
        raise ValueError(
            f"client_ids could not be sorted ({e}); use ids of one type, all ints or all strings"
        ) from None
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(names)).astype(np.int32)
    offsets = (np.cumsum(counts) - counts).astype(np.int32)
    return FederatedData(
        x=x[order],
        y=labels[order].astype(np.int32),
        offsets=offsets,
        counts=counts,
        num_classes=num_classes,
        max_count=int(counts.max()),
        client_names=tuple(names.tolist()),
    )


# ----------------------------------------------------------------------------- partitioning


def partition(
    y: Array,
    *,
    num_clients: int,
    method: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    sigma: float = 1.0,
    min_examples: int = 1,
) -> np.ndarray:
    """Assigns each example to a client, simulating a chosen kind of heterogeneity.

    Methods:
      * ``"iid"``: a random permutation split into ``num_clients`` near-equal parts.
      * ``"dirichlet"``: label skew (Hsu et al., 2019). For each class, client proportions are
        drawn from ``Dirichlet(alpha * ones(num_clients))`` and the class's shuffled examples are
        split accordingly. Proportions are redrawn (from the same generator) until every client
        has at least ``min_examples`` examples. Smaller ``alpha`` means more skew.
      * ``"shards"``: pathological label skew (McMahan et al., 2017). Examples are sorted by
        label (randomly within a label), cut into ``num_clients * shards_per_client`` near-equal
        shards, and each client gets ``shards_per_client`` random shards.
      * ``"quantity_skew"``: IID labels, but client sizes are proportional to
        ``lognormal(0, sigma)`` draws, each client getting at least ``min_examples``.

    Args:
      y: ``[N]`` labels (any sortable values; only used to group classes).
      num_clients: the number of clients ``K``, ``1 <= K <= N``.
      method: one of ``"iid"``, ``"dirichlet"``, ``"shards"``, ``"quantity_skew"``.
      seed: seed of the random generator.
      alpha: Dirichlet concentration (``"dirichlet"``), ``> 0``.
      shards_per_client: shards per client (``"shards"``), ``>= 1``.
      sigma: log-normal spread of client sizes (``"quantity_skew"``), ``>= 0``.
      min_examples: the least number of examples of any client (``"dirichlet"``,
        ``"quantity_skew"``; also checked for the other methods), ``>= 1``.

    Returns:
      ``[N]`` int32 client id of each example, with values in ``[0, num_clients)``; every
      client has at least ``min_examples`` examples.

    Raises:
      ValueError: on invalid arguments, or when the requested split is impossible (e.g. the
        Dirichlet resampling keeps leaving a client with too few examples).
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D with one label per example; got shape {y.shape}")
    n = len(y)
    if n == 0:
        raise ValueError("y has no examples; pass at least one label")
    num_clients = _check_int("num_clients", num_clients, 1, "pass a positive number of clients")
    if num_clients > n:
        raise ValueError(
            f"num_clients={num_clients} exceeds the {n} examples; every client needs an "
            f"example, so use num_clients <= {n}"
        )
    if method not in PARTITION_METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {', '.join(PARTITION_METHODS)}")
    if not (_is_real(alpha) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"alpha={alpha!r} must be a positive finite number; e.g. 0.1 (strong skew) to 100 "
            "(nearly IID)"
        )
    shards_per_client = _check_int(
        "shards_per_client", shards_per_client, 1, "pass a positive number of shards per client"
    )
    if not (_is_real(sigma) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma={sigma!r} must be a finite number >= 0; 0 gives equal sizes")
    min_examples = _check_int("min_examples", min_examples, 1, "pass a positive minimum")
    if num_clients * min_examples > n:
        raise ValueError(
            f"min_examples={min_examples} is impossible: num_clients={num_clients} clients "
            f"need {num_clients * min_examples} examples but there are {n}; lower "
            "min_examples or num_clients"
        )

    rng = np.random.default_rng(seed)
    if method == "iid":
        ids = _partition_iid(n, num_clients, rng)
    elif method == "dirichlet":
        ids = _partition_dirichlet(y, num_clients, alpha, min_examples, rng)
    elif method == "shards":
        ids = _partition_shards(y, num_clients, shards_per_client, rng)
    else:
        ids = _partition_quantity_skew(n, num_clients, sigma, min_examples, rng)

    sizes = np.bincount(ids, minlength=num_clients)
    if sizes.min() < min_examples:
        # Only reachable for "shards" with uneven shard sizes.
        raise ValueError(
            f"method={method!r} left a client with {int(sizes.min())} < min_examples="
            f"{min_examples} examples; lower min_examples, num_clients or shards_per_client"
        )
    return ids


def _split_sizes(n: int, parts: int) -> np.ndarray:
    """Sizes of ``parts`` near-equal consecutive pieces of ``n`` items (as np.array_split)."""
    return np.full(parts, n // parts) + (np.arange(parts) < n % parts)


def _assign_by_sizes(order: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Client id per example: the first ``sizes[0]`` of ``order`` go to client 0, and so on."""
    ids = np.empty(len(order), np.int32)
    ids[order] = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    return ids


def _partition_iid(n: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    return _assign_by_sizes(rng.permutation(n), _split_sizes(n, num_clients))


def _partition_dirichlet(
    y: np.ndarray, num_clients: int, alpha: float, min_examples: int, rng: np.random.Generator
) -> np.ndarray:
    _, cls = np.unique(y, return_inverse=True)
    cls = cls.reshape(-1)
    class_sizes = np.bincount(cls)
    # Draw proportions until every client is large enough. Sizes depend only on the
    # proportions, so the (costlier) shuffles happen once, after a successful draw.
    for _ in range(_DIRICHLET_MAX_TRIES):
        props = rng.dirichlet(np.full(num_clients, float(alpha)), size=len(class_sizes))
        if not np.all(np.isfinite(props)):
            continue
        bounds = (np.cumsum(props, axis=1) * class_sizes[:, None]).astype(np.int64)
        bounds[:, -1] = class_sizes  # guard against rounding below the class size
        bounds = np.maximum.accumulate(np.minimum(bounds, class_sizes[:, None]), axis=1)
        sizes = np.diff(bounds, axis=1, prepend=0)  # [num_classes, num_clients]
        if sizes.sum(axis=0).min() >= min_examples:
            break
    else:
        raise ValueError(
            f"method='dirichlet' could not give every one of num_clients={num_clients} clients "
            f"at least min_examples={min_examples} examples in {_DIRICHLET_MAX_TRIES} draws with "
            f"alpha={alpha}; use a larger alpha, fewer clients or a smaller min_examples"
        )
    ids = np.empty(len(y), np.int32)
    for c, class_sizes_c in enumerate(sizes):
        members = rng.permutation(np.flatnonzero(cls == c))
        ids[members] = np.repeat(np.arange(num_clients, dtype=np.int32), class_sizes_c)
    return ids


def _partition_shards(
    y: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> np.ndarray:
    n = len(y)
    num_shards = num_clients * shards_per_client
    if num_shards > n:
        raise ValueError(
            f"shards_per_client={shards_per_client} with num_clients={num_clients} needs "
            f"{num_shards} shards but there are only {n} examples; lower shards_per_client"
        )
    _, cls = np.unique(y, return_inverse=True)
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(cls.reshape(-1)[shuffled], kind="stable")]  # by label
    shard_of_example = np.repeat(np.arange(num_shards), _split_sizes(n, num_shards))
    client_of_shard = np.empty(num_shards, np.int32)
    client_of_shard[rng.permutation(num_shards)] = np.repeat(
        np.arange(num_clients, dtype=np.int32), shards_per_client
    )
    ids = np.empty(n, np.int32)
    ids[order] = client_of_shard[shard_of_example]
    return ids


def _partition_quantity_skew(
    n: int, num_clients: int, sigma: float, min_examples: int, rng: np.random.Generator
) -> np.ndarray:
    weights = rng.lognormal(0.0, sigma, size=num_clients)
    share = weights / weights.sum() * (n - num_clients * min_examples)
    sizes = min_examples + np.floor(share).astype(np.int64)
    # Hand the leftover examples to the largest fractional parts.
    leftover = n - int(sizes.sum())
    sizes[np.argsort(-(share - np.floor(share)), kind="stable")[:leftover]] += 1
    return _assign_by_sizes(rng.permutation(n), sizes)


# ----------------------------------------------------------------------------- datasets


def load_digits(
    *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Loads scikit-learn's bundled 8x8 handwritten digits (1797 examples, no download).

    Args:
      test_fraction: the fraction of examples held out for testing, in ``(0, 1)``.
      seed: seed of the random train/test split.

    Returns:
      ``((x_train, y_train), (x_test, y_test))`` with ``x`` float32 ``[n, 64]`` in ``[0, 1]``
      and ``y`` int32 in ``[0, 10)``. The test set has ``round(1797 * test_fraction)``
      examples (at least one, and at least one is left for training).

    Raises:
      ValueError: if ``test_fraction`` is not in ``(0, 1)``.
    """
    if not (_is_real(test_fraction) and 0 < test_fraction < 1):
        raise ValueError(
            f"test_fraction={test_fraction!r} must be a number strictly between 0 and 1, e.g. 0.2"
        )
    from sklearn import datasets  # Imported lazily: scikit-learn is slow to import.

    x, y = datasets.load_digits(return_X_y=True)
    x = (np.asarray(x, np.float32) / 16.0).astype(np.float32)
    y = np.asarray(y, np.int32)
    n = len(y)
    num_test = min(max(round(n * test_fraction), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    test, train = perm[:num_test], perm[num_test:]
    return (x[train], y[train]), (x[test], y[test])


def make_federated(
    x: Array,
    y: Array,
    *,
    num_clients: int,
    method: str = "iid",
    seed: int = 0,
    num_classes: int | None = None,
    **partition_kwargs: Any,
) -> FederatedData:
    """Partitions ``(x, y)`` among clients with :func:`partition` and builds the dataset.

    Args:
      x: ``[N, *feature_shape]`` features.
      y: ``[N]`` integer labels in ``[0, num_classes)``.
      num_clients: the number of clients.
      method: the partition method (see :func:`partition`).
      seed: seed of the partition.
      num_classes: the number of classes; defaults to ``max(y) + 1``.
      **partition_kwargs: further arguments of :func:`partition` (``alpha``,
        ``shards_per_client``, ``sigma``, ``min_examples``).

    Returns:
      The federated dataset; client ``k`` holds the examples that :func:`partition` assigned
      to ``k``, in their original order.

    Raises:
      ValueError: on invalid arguments (see :func:`partition` and :func:`from_arrays`).
    """
    client_ids = partition(y, num_clients=num_clients, method=method, seed=seed, **partition_kwargs)
    return from_arrays(x, y, client_ids, num_classes=num_classes)


def synthetic_classification(
    *,
    num_clients: int,
    examples_per_client: int,
    feature_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    seed: int = 0,
) -> FederatedData:
    """Synthetic Gaussian classification data for benchmarks.

    Each class has a random mean; an example is its class's mean plus standard normal noise,
    and labels are uniform. Every client has exactly ``examples_per_client`` examples.

    Args:
      num_clients: the number of clients, ``>= 1``.
      examples_per_client: examples per client, ``>= 1``.
      feature_shape: the shape of one example (positive ints).
      num_classes: the number of classes, ``>= 2``.
      seed: seed of the generator; the data is a deterministic function of the arguments.

    Returns:
      A host :class:`FederatedData` with ``num_clients * examples_per_client`` examples.

    Raises:
      ValueError: on invalid arguments.
    """
    num_clients = _check_int("num_clients", num_clients, 1, "pass a positive number of clients")
    examples_per_client = _check_int(
        "examples_per_client", examples_per_client, 1, "pass a positive number of examples"
    )
    num_classes = _check_int("num_classes", num_classes, 2, "pass at least 2 classes")
    try:
        feature_shape = tuple(int(d) for d in feature_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"feature_shape={feature_shape!r} must be a sequence of positive ints, e.g. (28, 28, 1)"
        ) from None
    if any(d < 1 for d in feature_shape):
        raise ValueError(
            f"feature_shape={feature_shape} must contain only positive sizes, e.g. (28, 28, 1)"
        )
    rng = np.random.default_rng(seed)
    n = num_clients * examples_per_client
    dim = math.prod(feature_shape)
    means = rng.standard_normal((num_classes, dim), dtype=np.float32)
    y = rng.integers(0, num_classes, size=n).astype(np.int32)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x += means[y]
    counts = np.full(num_clients, examples_per_client, np.int32)
    return FederatedData(
        x=x.reshape((n,) + feature_shape),
        y=y,
        offsets=(np.arange(num_clients, dtype=np.int32) * examples_per_client).astype(np.int32),
        counts=counts,
        num_classes=num_classes,
        max_count=examples_per_client,
    )
