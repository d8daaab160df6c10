"""Cohort sampling on device: fixed-size without replacement, or Poisson padded to a static size."""

from __future__ import annotations

import fractions
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class CohortSampler(NamedTuple):
    """Samples the clients of one round.

    **Contract.** A round's cohort is ``(ids: int32[C], mask: bool[C], overflow: int32[])``:
    ``C`` is the static padded cohort size; the REAL clients come first, then the entries with
    ``mask=False`` (padding, whose ids are never used). ``overflow`` counts clients that
    Poisson sampling selected but that did not fit in ``C`` (a round metric; like the
    realised cohort size it depends on who is in the population, so a DP run keeps it
    internal, see ``docs/privacy.md``). The round calls :meth:`step` with its sampling key,
    the round index (``ServerState.round``, traced) and the sampler's state
    (``ServerState.sampler_state``); a sampler's state may evolve only from its keys and the
    round index, never from the data or the model, so the host can sample ahead of training
    (:class:`fedjax_dp.population.CohortPrefetcher`) and the cohort's distribution is the
    one the accountant analyses.

    Attributes:
      sample: ``key -> (ids, mask, overflow)`` of a stateless sampler (the cohort does not
        depend on the round index); ``None`` for a stateful one.
      cohort_size: the static ``C``.
      expected_cohort_size: the public expected number of real clients per round, used as the
        denominator of DP aggregation.
      sampling: ``"fixed"``, ``"poisson"`` or ``"shuffle"``.
      num_clients: population size.
      sampling_rate: ``q`` for Poisson sampling (the accounted rate; the true inclusion
        probability is ``inclusion_threshold(q) / 2**32 <= q``), ``C / num_clients`` for
        fixed size and shuffling.
      draw: ``(key, round_index, state) -> (ids, mask, overflow, new_state)`` of a stateful
        sampler; ``None`` for a stateless one.
      init_state: ``() -> state``, the state before round 0 (a pytree of arrays; ``None``:
        stateless).
    """

    sample: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]] | None
    cohort_size: int
    expected_cohort_size: float
    sampling: str
    num_clients: int
    sampling_rate: float
    draw: Callable[..., tuple[jax.Array, jax.Array, jax.Array, Any]] | None = None
    init_state: Callable[[], Any] | None = None

    @property
    def stateful(self) -> bool:
        """Whether the cohort depends on the round index and the sampler's state."""
        return self.draw is not None

    def initial_state(self) -> Any:
        """The sampler state before round 0 (``()`` for a stateless sampler)."""
        return () if self.init_state is None else self.init_state()

    def step(self, key: jax.Array, round_index: jax.Array, state: Any):
        """``(ids, mask, overflow, new_state)`` of round ``round_index`` (see the contract)."""
        if self.draw is not None:
            return self.draw(key, round_index, state)
        return (*self.sample(key), state)


def fixed_size(num_clients: int, cohort_size: int) -> CohortSampler:
    """Samples exactly ``cohort_size`` distinct clients uniformly at random."""
    _check_cohort_size(num_clients, cohort_size)

    def sample(key):
        ids = jax.random.choice(key, num_clients, (cohort_size,), replace=False)
        return ids.astype(jnp.int32), jnp.ones((cohort_size,), bool), jnp.zeros((), jnp.int32)

    return CohortSampler(
        sample, cohort_size, float(cohort_size), "fixed", num_clients, cohort_size / num_clients
    )


def shuffled(num_clients: int, cohort_size: int) -> CohortSampler:
    """Epochs of disjoint cohorts: every ``num_clients // cohort_size`` rounds a fresh uniformly
    random permutation of the clients is drawn, and round ``r`` takes the ``(r mod E)``-th
    block of ``cohort_size`` clients of it (``E = num_clients // cohort_size``; the last
    ``num_clients mod cohort_size`` clients of each permutation sit that epoch out).

    A stateful sampler (its state is the epoch's permutation, ``int32[num_clients]``): every
    client takes part exactly once per epoch, as in cyclic participation. It has no
    amplification-by-sampling analysis here, so DP runs refuse it (use ``"fixed"`` or
    ``"poisson"``).
    """
    _check_cohort_size(num_clients, cohort_size)
    epoch = num_clients // cohort_size

    def draw(key, round_index, perm):
        position = jnp.asarray(round_index, jnp.int32) % epoch
        perm = jax.lax.cond(
            position == 0,
            lambda: jax.random.permutation(key, num_clients).astype(jnp.int32),
            lambda: perm,
        )
        ids = jax.lax.dynamic_slice(perm, (position * cohort_size,), (cohort_size,))
        return ids, jnp.ones((cohort_size,), bool), jnp.zeros((), jnp.int32), perm

    return CohortSampler(
        None,
        cohort_size,
        float(cohort_size),
        "shuffle",
        num_clients,
        cohort_size / num_clients,
        draw=draw,
        init_state=lambda: jnp.arange(num_clients, dtype=jnp.int32),
    )


def inclusion_threshold(sampling_rate: float) -> int:
    """The integer threshold of Poisson inclusion: ``floor(sampling_rate * 2**32)``.

    :func:`poisson` includes a client when its 32 random bits, read as an unsigned integer,
    are below this threshold, so the true inclusion probability is exactly
    ``inclusion_threshold(q) / 2**32``, which is ``<= q`` and above ``q - 2**-32``. Computed
    on the host with Python's exact rational arithmetic (``q`` is a binary float, so
    ``q * 2**32`` is exact). ``q = 1`` gives ``2**32`` (every client).

    Raises:
      ValueError: ``sampling_rate`` is not in ``(0, 1]``, or is below ``2**-32`` (its threshold
        would be 0: no client could ever be included).

    Examples:
      >>> inclusion_threshold(1e-6)  # true rate 4294 / 2**32 = 9.9977e-07 <= 1e-6
      4294
    """
    q = sampling_rate
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not (0.0 < q <= 1.0):
        raise ValueError(f"sampling_rate={q!r} must be in (0, 1]; it is the inclusion probability")
    threshold = math.floor(fractions.Fraction(q) * 2**32)
    if threshold == 0:
        raise ValueError(
            f"sampling_rate={q!r} is below 2**-32 = {2.0**-32:.3g}, the resolution of the "
            "sampler's 32-bit inclusion test (no client could ever be included); use a "
            "larger sampling_rate"
        )
    return threshold


def poisson(
    num_clients: int, sampling_rate: float, max_cohort_size: int | None = None
) -> CohortSampler:
    """Includes each client independently with probability ``sampling_rate``.

    **Inclusion.** Client ``i`` draws 32 random bits ``b_i`` (an unsigned integer) and is
    included when ``b_i < inclusion_threshold(q) = floor(q * 2**32)``, an exact integer
    comparison: the true inclusion probability is ``floor(q * 2**32) / 2**32``, at most ``q``
    and less than ``2**-32`` below it. A float comparison ``uniform < q`` would not be exact:
    float32 uniforms lie on a grid of ``2**-23``, which over-samples small rates (by 7 % at
    ``q = 1e-6``). The accountant is given ``q`` itself: the privacy loss of a Poisson
    subsampled mechanism is non-decreasing in the sampling rate (the hockey-stick divergence
    of the mixture is convex in the rate and 0 at rate 0), so accounting with ``q`` bounds
    the true rate's from above. A ``q`` whose threshold is 0 (``q < 2**-32``) is refused.

    **Padding and overflow.** The cohort is padded to the static ``max_cohort_size`` (default:
    mean + 8 standard deviations, so overflow is astronomically unlikely, and at most
    ``num_clients + 1``, a cap that cannot truncate); the real clients
    come first, then padding (``mask=False``). If more clients are included, a uniformly
    random subset of ``max_cohort_size`` of them is kept and the rest is counted in
    ``overflow``: the included clients are ordered by independent 24-bit random priorities,
    and clients tied at the cut are re-drawn among themselves until the cut separates them,
    so neither ties nor client ids can bias which clients are kept. The realised cohort size
    and ``overflow`` are functions of who is in the population: private under user-level DP
    (see ``docs/privacy.md``, "What a run releases").
    """
    _check_population(num_clients)
    q = sampling_rate
    threshold = inclusion_threshold(q)
    mean = num_clients * q
    if max_cohort_size is None:
        # At most N + 1: a cap of N + 1 never truncates, on this population or on a
        # neighbouring one with one more client (a cap of N would truncate there, always at
        # q = 1, and the accountant would rightly charge it).
        max_cohort_size = min(
            num_clients + 1, math.ceil(mean + 8.0 * math.sqrt(mean * (1 - q)) + 1)
        )
    if (
        isinstance(max_cohort_size, bool)
        or int(max_cohort_size) != max_cohort_size
        or not 1 <= max_cohort_size <= num_clients + 1
    ):
        raise ValueError(
            f"max_cohort_size={max_cohort_size} must be an integer in [1, num_clients + 1 = "
            f"{num_clients + 1}]"
        )
    size = int(max_cohort_size)
    slots = max(size, num_clients)  # top_k needs at least `size` candidates

    def sample(key):
        if threshold >= 2**32:  # q = 1: every client
            included = jnp.ones((num_clients,), bool)
        else:
            bits = jax.random.bits(jax.random.fold_in(key, _INCLUDE), (num_clients,), jnp.uint32)
            included = bits < jnp.uint32(threshold)
        priority = _priorities(jax.random.fold_in(key, _PRIORITY), num_clients, bits=24)
        pad = slots - num_clients  # 0, or 1 never-included candidate for a cap of N + 1
        ids, mask = _keep_uniform_subset(
            jnp.pad(included, (0, pad)),
            jnp.pad(priority, (0, pad)),
            size,
            jax.random.fold_in(key, _TIES),
        )
        ids = jnp.minimum(ids, num_clients - 1)  # a padding slot's id is any valid id
        overflow = jnp.sum(included, dtype=jnp.int32) - jnp.sum(mask, dtype=jnp.int32)
        return ids, mask, overflow

    return CohortSampler(sample, size, float(mean), "poisson", num_clients, float(q))


# Sub-keys of a Poisson draw: inclusion bits, priorities, tie re-draws.
_INCLUDE, _PRIORITY, _TIES = 0, 1, 2
# The score of a client already known to be kept: above every priority (< 2**24).
_KEPT = float(2**24)


def _priorities(key: jax.Array, n: int, *, bits: int) -> jax.Array:
    """``f32[n]`` independent uniform integer priorities in ``[0, 2**bits)``, ``bits <= 24``
    (exact in float32, whose ``top_k`` is fast)."""
    return (jax.random.bits(key, (n,), jnp.uint32) >> (32 - bits)).astype(jnp.float32)


def _keep_uniform_subset(
    included: jax.Array, priority: jax.Array, size: int, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(ids: int32[size], mask: bool[size])``: a uniformly random subset of the included
    clients of at most ``size`` clients, real clients first.

    Args:
      included: ``bool[n]``, who is selected.
      priority: ``f32[n]``, i.i.d. integer priorities in ``[0, 2**24)`` (independent of
        ``included``); the ``size`` included clients of highest priority are kept.
      size: the static cohort size.
      key: re-draws priorities among clients tied at the cut (24-bit priorities do tie, and
        ``top_k`` would break ties by client id).

    While the cut (the ``size``-th highest score) falls inside a group of tied clients, the
    clients above it are marked kept, those below it dropped, and the tied ones draw fresh
    priorities; each step treats the tied clients symmetrically, so the kept subset is
    exactly uniform among the included clients. A tie at the cut is rare (probability
    about ``size * 2**-24`` in a round that overflows), so the loop body almost never runs.
    """
    n = included.shape[0]
    score = jnp.where(included, priority, -1.0)  # -1: not included (padding)
    vals, ids = jax.lax.top_k(score, size)

    def tie_at_cut(carry):
        score, vals, _, _ = carry
        cut = vals[size - 1]
        return (cut >= 0) & (jnp.sum(score == cut) > jnp.sum(vals == cut))

    def redraw(carry):
        score, vals, _, i = carry
        cut = vals[size - 1]
        fresh = _priorities(jax.random.fold_in(key, i), n, bits=23)  # < _KEPT
        score = jnp.where(score > cut, _KEPT, jnp.where(score == cut, fresh, -1.0))
        vals, ids = jax.lax.top_k(score, size)
        return score, vals, ids, i + 1

    _, vals, ids, _ = jax.lax.while_loop(
        tie_at_cut, redraw, (score, vals, ids, jnp.zeros((), jnp.int32))
    )
    return ids.astype(jnp.int32), vals >= 0


def _check_cohort_size(num_clients, cohort_size):
    _check_population(num_clients)
    if not isinstance(cohort_size, int) or isinstance(cohort_size, bool) or cohort_size < 1:
        raise ValueError(f"cohort_size={cohort_size!r} must be a positive integer")
    if cohort_size > num_clients:
        raise ValueError(
            f"cohort_size={cohort_size} is larger than the population of {num_clients} clients; "
            f"use cohort_size <= {num_clients}"
        )


def _check_population(num_clients):
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r} must be a positive integer")
