"""Populations larger than device memory: client data on the host, one cohort on the device.

A :class:`HostPopulation` keeps every client's examples in host (numpy) memory, or in a
memory-mapped file. Each round only the sampled cohort is gathered into a compact
:class:`~fedjax_dp.data.FederatedData` of static shape (``cohort_size`` clients of
``max_count`` rows each) and moved to the device; the round consumes it through
``round_fn(state, cohort_data, hparams, key, cohort)``, which gives the same result as the
device-resident round ``round_fn(state, data, hparams, key)`` for the same key.

:class:`CohortPrefetcher` overlaps that host work with the device: a background thread
samples the cohort of the next round key (:attr:`fedjax_dp.Round.sample`), gathers it, moves
it to the device (``jax.device_put``) and queues it (at most ``depth`` cohorts ahead) while
the current round runs::

    population = fedjax_dp.population.HostPopulation(x, y, counts)
    sim = fedjax_dp.build_simulation(config, model, population)  # uses its static facts
    keys = [jax.random.fold_in(root, r) for r in range(num_rounds)]
    state, history = fedjax_dp.population.run_rounds(sim, state, population, hparams, keys)

Only cohort-sized arrays (and the sampler's per-round draw of ``num_clients`` scalars)
ever reach the device.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, final

import jax
import numpy as np

from fedjax_dp.core.round import Cohort, Round
from fedjax_dp.data import ClientTable, FederatedData
from fedjax_dp.runner import loop

__all__ = [
    "Cohort",
    "CohortPrefetcher",
    "HostPopulation",
    "PreparedCohort",
    "prefetch_cohorts",
    "run_rounds",
]


class HostPopulation(ClientTable):
    """Every client's examples in host memory, gathered one cohort at a time.

    Client ``k`` owns rows ``x[offsets[k]:offsets[k] + counts[k]]`` (and the same rows of
    ``y``); blocks need not be contiguous or in order. Nothing is copied: ``x`` may be any
    array supporting numpy fancy indexing (a ``np.memmap`` keeps the population on disk).
    ``x`` may be stored in a narrower float dtype (e.g. float16) and ``y`` in a narrow integer
    dtype (e.g. uint8) to save host memory; gathered cohorts are float32 and int32.

    The attributes ``num_clients``, ``max_count``, ``feature_shape`` and ``num_classes`` match
    :class:`~fedjax_dp.data.FederatedData`'s, so :func:`fedjax_dp.build_simulation` accepts a
    population in place of a dataset (it reads only these static facts).

    Args:
      x: ``[N, *feature_shape]`` real features.
      y: ``[N]`` integer labels in ``[0, num_classes)``.
      counts: ``[K]`` examples per client, all ``>= 1``.
      offsets: ``[K]`` first row of each client; default ``cumsum(counts) - counts``
        (clients stored one after another).
      num_classes: the number of classes; default ``max(y) + 1``.

    Raises:
      ValueError: on inconsistent shapes, empty clients, blocks outside ``x`` or labels out
        of range (``x`` itself is never scanned).
    """

    def __init__(
        self,
        x: Any,
        y: Any,
        counts: Any,
        offsets: Any | None = None,
        *,
        num_classes: int | None = None,
    ):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = np.asarray(x)
        y = np.asarray(y)
        counts = np.asarray(counts)
        if len(x.shape) < 1 or np.dtype(x.dtype).kind not in "biuf":
            raise ValueError(
                f"x must be a real array of shape [N, *feature_shape]; got {x.dtype} {x.shape}"
            )
        n = int(x.shape[0])
        if y.shape != (n,) or y.dtype.kind not in "iu":
            raise ValueError(f"y must be integer labels of shape ({n},); got {y.dtype} {y.shape}")
        if counts.ndim != 1 or counts.size == 0 or counts.dtype.kind not in "iu":
            raise ValueError(f"counts must be a non-empty 1-D integer array; got {counts.shape}")
        if counts.min() < 1:
            raise ValueError(
                f"client {int(np.argmin(counts))} has {int(counts.min())} examples; every "
                "client needs at least one"
            )
        counts = counts.astype(np.int32, copy=False)
        if offsets is None:
            offsets = np.cumsum(counts, dtype=np.int64) - counts
        offsets = np.asarray(offsets)
        if offsets.shape != counts.shape or offsets.dtype.kind not in "iu":
            raise ValueError(
                f"offsets must be integers of the shape of counts {counts.shape}; got "
                f"{offsets.dtype} {offsets.shape}"
            )
        offsets = offsets.astype(np.int64, copy=False)
        if offsets.min() < 0 or int((offsets + counts).max()) > n:
            raise ValueError(
                f"some client's block offsets[k]:offsets[k]+counts[k] is outside x[{n}]"
            )
        lo, hi = int(y.min()), int(y.max())
        if num_classes is None:
            num_classes = max(hi + 1, 2)
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels in [{lo}, {hi}] are outside [0, num_classes={num_classes})")
        self.x, self.y, self.counts, self.offsets = x, y, counts, offsets
        self.num_classes = int(num_classes)
        self.max_count = int(counts.max())

    @classmethod
    def from_federated_data(cls, data: FederatedData) -> HostPopulation:
        """The population of a :class:`~fedjax_dp.data.FederatedData` (host copies, if needed)."""
        return cls(
            np.asarray(data.x),
            np.asarray(data.y),
            np.asarray(data.counts),
            np.asarray(data.offsets),
            num_classes=data.num_classes,
        )

    @property
    def nbytes(self) -> int:
        """Host bytes of ``x``, ``y``, ``counts`` and ``offsets``."""
        return int(sum(a.nbytes for a in (self.x, self.y, self.counts, self.offsets)))

    def cohort_nbytes(self, cohort_size: int) -> int:
        """Bytes of one gathered cohort of ``cohort_size`` slots (what goes to the device)."""
        rows = cohort_size * self.max_count
        return rows * (math.prod(self.feature_shape) * 4 + 4) + cohort_size * 8

    def gather(self, ids: Any, mask: Any | None = None) -> FederatedData:
        """The data of the clients ``ids`` as a compact, fixed-shape host dataset.

        Slot ``i`` holds client ``ids[i]`` in rows ``[i * max_count, i * max_count +
        counts[ids[i]])``; the rest of its ``max_count`` rows are zeros. Slots with
        ``mask[i] = False`` (padding) hold one zero example (their ids are never looked up).
        Shapes depend only on ``len(ids)``, so a round compiled for one cohort serves every
        cohort of the same size.

        Args:
          ids: ``[C]`` client ids in ``[0, num_clients)`` (masked slots: any value).
          mask: optional ``bool[C]``; default all True.

        Returns:
          A host :class:`~fedjax_dp.data.FederatedData` with ``C`` clients,
          ``C * max_count`` float32 rows, int32 labels and this population's ``max_count``
          and ``num_classes``.

        Raises:
          ValueError: on a real slot whose id is out of range, or mismatched shapes.
        """
        ids = np.asarray(ids).astype(np.int64, copy=False).reshape(-1)
        c, m = ids.shape[0], self.max_count
        real = np.ones(c, bool) if mask is None else np.asarray(mask, bool).reshape(-1)
        if real.shape != (c,):
            raise ValueError(f"mask has shape {real.shape}; expected ({c},) like ids")
        bad = real & ((ids < 0) | (ids >= self.num_clients))
        if bad.any():
            raise ValueError(
                f"client id {int(ids[bad][0])} is not in [0, num_clients={self.num_clients}); "
                "was the round built for a different population?"
            )
        safe = np.where(real, ids, 0)
        counts = np.where(real, self.counts[safe], 1).astype(np.int32)
        slot_rows = np.arange(m, dtype=np.int64)
        valid = ((slot_rows[None, :] < counts[:, None]) & real[:, None]).reshape(-1)  # [C*M]
        # One gather per array into a fresh buffer; invalid rows (past a client's data, or of
        # masked slots) are read from row 0, then zeroed.
        src = (self.offsets[safe][:, None] + slot_rows[None, :]).reshape(-1)
        src = np.where(valid, src, 0)
        x = np.empty((c * m, *self.feature_shape), np.float32)
        y = np.empty((c * m,), np.int32)
        _take_rows(self.x, src, x)
        _take_rows(self.y, src, y)
        x[~valid] = 0.0
        y[~valid] = 0
        return FederatedData(
            x=x,
            y=y,
            offsets=np.arange(c, dtype=np.int32) * np.int32(m),
            counts=counts,
            num_classes=self.num_classes,
            max_count=m,
        )

    def to_federated_data(self) -> FederatedData:
        """The whole population as a host :class:`~fedjax_dp.data.FederatedData` (a copy of
        ``x`` as float32 if stored otherwise; for small populations and tests)."""
        return FederatedData(
            x=np.asarray(self.x, np.float32),
            y=np.asarray(self.y, np.int32),
            offsets=self.offsets.astype(np.int32),
            counts=self.counts,
            num_classes=self.num_classes,
            max_count=self.max_count,
        )

    def __repr__(self) -> str:
        return (
            f"HostPopulation(num_clients={self.num_clients}, num_examples={self.num_examples}, "
            f"feature_shape={self.feature_shape}, max_count={self.max_count}, "
            f"num_classes={self.num_classes}, {self.nbytes / 2**20:.1f} MiB)"
        )


def _take_rows(a: Any, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = a[rows]``, without a temporary when ``a`` is an ndarray of ``out``'s dtype."""
    if type(a) is np.ndarray and a.dtype == out.dtype:
        np.take(a, rows, axis=0, out=out, mode="clip")  # rows are valid; "clip" avoids buffering
    else:
        out[...] = a[rows]


class PreparedCohort(NamedTuple):
    """One round's inputs, ready on the device.

    Attributes:
      index: position of ``key`` in the key sequence.
      key: the round key (pass it to ``round_fn`` unchanged).
      cohort: the :class:`fedjax_dp.round.Cohort` that ``Round.sample(key)`` drew.
      data: the cohort's :class:`~fedjax_dp.data.FederatedData` on the device.
      prepare_s: host seconds spent sampling, gathering and transferring it.
    """

    index: int
    key: jax.Array
    cohort: Cohort
    data: FederatedData
    prepare_s: float


_DONE = object()


class _Failure(NamedTuple):
    error: BaseException


def _as_round(sim_or_round: Any) -> Round:
    rnd = sim_or_round if isinstance(sim_or_round, Round) else getattr(sim_or_round, "round", None)
    if not isinstance(rnd, Round):
        raise TypeError(
            f"expected a fedjax_dp.Round or a Simulation; got {type(sim_or_round).__name__}"
        )
    if rnd.sample is None:
        raise ValueError("this Round has no sample function; build it with fedjax_dp.build_round")
    return rnd


def _check_population(sim_or_round: Any, population: HostPopulation) -> None:
    sampler = getattr(sim_or_round, "sampler", None)
    if sampler is not None and sampler.num_clients != population.num_clients:
        raise ValueError(
            f"the simulation samples from {sampler.num_clients} clients but the population has "
            f"{population.num_clients}; build the simulation from this population"
        )


def _stateless(sample):
    def step(key, round_index, sampler_state):
        return sample(key), sampler_state

    return step


def _produce(stop, out, sample_step, start, population, keys, device):
    """The prefetch thread: sample, gather, device_put, queue; stops when ``stop`` is set.

    It holds no reference to its :class:`CohortPrefetcher`, so an abandoned prefetcher can be
    garbage collected, which sets ``stop``.
    """

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    round_index, sampler_state = start
    try:
        for index, key in enumerate(keys):
            if stop.is_set():
                return
            t0 = time.perf_counter()
            cohort, sampler_state = sample_step(key, round_index + index, sampler_state)
            ids, mask = jax.device_get((cohort.ids, cohort.mask))
            data = population.gather(ids, mask)
            data, cohort = jax.device_put((data, cohort), device)
            jax.block_until_ready((data, cohort))
            if not put(PreparedCohort(index, key, cohort, data, time.perf_counter() - t0)):
                return
        put(_DONE)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
        put(_Failure(e))


@final
class CohortPrefetcher:
    """Yields each round key's cohort, sampled, gathered and on the device, ahead of time.

    A background thread walks ``keys``; for each key it runs the round's jitted sampler
    (``Round.sample(key)``, the same cohort ``round_fn`` would draw), gathers the cohort from
    ``population`` on the host (:meth:`HostPopulation.gather`), moves it to the device
    (``jax.device_put``) and queues a :class:`PreparedCohort`. At most ``depth`` cohorts wait
    in the queue (plus one being prepared and the one in use), so memory stays bounded
    whatever the population.

    Use it as a context manager (or call :meth:`close`) so the thread stops when the
    consumer stops early or raises; an error in the thread is re-raised by ``next()``.

    Args:
      sim_or_round: a :class:`fedjax_dp.Simulation` or :class:`fedjax_dp.Round`.
      population: the :class:`HostPopulation` the round samples from.
      keys: the round keys, in order (any iterable; consumed by the thread).
      depth: queue depth, ``>= 1`` (2: the next round is ready while one more is gathered).
      device: optional ``jax.device_put`` target for the cohort (a device or a sharding);
        default: the default device.
      state: the :class:`fedjax_dp.ServerState` the first key's round starts from; needed
        with a stateful sampler (``sampling="shuffle"``), whose cohorts follow the round
        index and the sampler state (which evolve from the keys alone, so the thread can
        run ahead of training). Default: round 0 of a stateless sampler.
    """

    def __init__(
        self,
        sim_or_round: Any,
        population: HostPopulation,
        keys: Iterable[jax.Array],
        *,
        depth: int = 2,
        device: Any = None,
        state: Any = None,
    ):
        if int(depth) != depth or depth < 1:
            raise ValueError(f"depth={depth!r} must be a positive integer")
        rnd = _as_round(sim_or_round)
        _check_population(sim_or_round, population)
        if rnd.sample_step is not None and state is not None:
            step = rnd.sample_step
            start = (int(jax.device_get(state.round)), jax.device_get(state.sampler_state))
        else:  # a stateful sampler's Round.sample raises, naming state=
            step, start = _stateless(rnd.sample), (0, ())
        self._queue: queue.Queue = queue.Queue(maxsize=int(depth))
        self._stop = threading.Event()
        self._done = False
        self.thread = threading.Thread(
            target=_produce,
            args=(self._stop, self._queue, step, start, population, iter(keys), device),
            name="fedjax_dp-cohort-prefetch",
            daemon=True,
        )
        weakref.finalize(self, self._stop.set)
        self.thread.start()

    def __iter__(self) -> CohortPrefetcher:
        return self

    def __next__(self) -> PreparedCohort:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self._queue.empty():
                    self.close()  # stopped without a final item: closed from elsewhere
                    raise StopIteration from None
        if item is _DONE:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stops the thread, drops queued cohorts and waits for the thread to end."""
        self._done = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self.thread is not threading.current_thread():
            self.thread.join()

    def __enter__(self) -> CohortPrefetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def prefetch_cohorts(
    sim_or_round: Any,
    population: HostPopulation,
    keys: Iterable[jax.Array],
    *,
    depth: int = 2,
    device: Any = None,
    state: Any = None,
) -> CohortPrefetcher:
    """A :class:`CohortPrefetcher` (see there for the arguments)::

    with prefetch_cohorts(sim, population, keys, state=state) as cohorts:
        for c in cohorts:
            state, metrics = sim.round_fn(state, c.data, hparams, c.key, c.cohort)
    """
    return CohortPrefetcher(sim_or_round, population, keys, depth=depth, device=device, state=state)


def run_rounds(
    sim_or_round: Any,
    state: Any,
    population: HostPopulation,
    hparams: dict[str, Any],
    keys: Iterable[jax.Array],
    *,
    depth: int = 2,
    device: Any = None,
    callbacks: Sequence[loop.Callback] = (),
    client_states: Any = None,
) -> tuple[Any, list[dict[str, jax.Array]]]:
    """Runs one round per key on a host-resident population, prefetching the cohorts.

    Equal to ``state, m = round_fn(state, population_data, hparams, key)`` for each key with
    the whole population on the device, but only one cohort at a time (plus ``depth`` queued)
    is on the device.

    Args:
      sim_or_round: a :class:`fedjax_dp.Simulation` or :class:`fedjax_dp.Round`.
      state: the :class:`fedjax_dp.ServerState` (donated to the first round).
      population: the :class:`HostPopulation`.
      hparams: the round's hyper-parameters (e.g. ``sim.make_hparams()``).
      keys: round keys, in order.
      depth: prefetch queue depth.
      device: optional ``jax.device_put`` target of the cohorts.
      callbacks: more :class:`fedjax_dp.runner.loop.Callback` s of the round loop
        (:func:`fedjax_dp.runner.loop.train_loop`: evaluation, progress, ...).
      client_states: the :class:`fedjax_dp.runner.host_states.HostClientStates` of a round
        built with ``host_client_states=True`` (required then): each round gathers the
        cohort's state rows from it and scatters the written rows back.

    Returns:
      ``(state, history)``: the final state and each round's metrics (device scalars, not
      synchronised).
    """
    rnd = _as_round(sim_or_round)
    if rnd.host_client_states and client_states is None:
        raise ValueError(
            "the round keeps its per-client state on the host (host_client_states=True): "
            "pass client_states=fedjax_dp.runner.host_states.HostClientStates(state, "
            "population.num_clients)"
        )
    keys = list(keys)
    history = _Collect()
    prefetcher = prefetch_cohorts(
        sim_or_round, population, keys, depth=depth, device=device, state=state
    )
    with prefetcher as cohorts:

        def step(state, r):
            c = next(cohorts)  # the prefetched cohort of keys[r]
            if client_states is not None:
                return client_states.round(rnd.round_fn, state, c.data, hparams, c.key, c.cohort)
            return rnd.round_fn(state, c.data, hparams, c.key, c.cohort)

        state = loop.train_loop(step, state, rounds=len(keys), callbacks=[history, *callbacks])
    return state, history.metrics


class _Collect(loop.Callback):
    """Each round's metrics, left on the device."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, jax.Array]] = []

    def on_round_end(self, done: int, state: Any, metrics: dict[str, jax.Array]) -> None:
        self.metrics.append(metrics)
