"""Cohort sampling on device: fixed-size without replacement, or Poisson padded to a static size."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


class CohortSampler(NamedTuple):
    """Samples the clients of one round.

    Attributes:
      sample: ``key -> (ids: int32[C], mask: bool[C], overflow: int32[])``. ``C`` is the static
        padded cohort size; entries with ``mask=False`` are padding. ``overflow`` counts
        clients that Poisson sampling selected but that did not fit in ``C`` (reported in the
        round metrics, never silently dropped).
      cohort_size: the static ``C``.
      expected_cohort_size: the public expected number of real clients per round, used as the
        denominator of DP aggregation.
      sampling: ``"fixed"`` or ``"poisson"``.
      num_clients: population size.
      sampling_rate: ``q`` for Poisson sampling, ``C / num_clients`` for fixed.
    """

    sample: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]
    cohort_size: int
    expected_cohort_size: float
    sampling: str
    num_clients: int
    sampling_rate: float


def fixed_size(num_clients: int, cohort_size: int) -> CohortSampler:
    """Samples exactly ``cohort_size`` distinct clients uniformly at random."""
    _check_population(num_clients)
    if not isinstance(cohort_size, int) or isinstance(cohort_size, bool) or cohort_size < 1:
        raise ValueError(f"cohort_size={cohort_size!r} must be a positive integer")
    if cohort_size > num_clients:
        raise ValueError(
            f"cohort_size={cohort_size} is larger than the population of {num_clients} clients; "
            f"use cohort_size <= {num_clients}"
        )

    def sample(key):
        ids = jax.random.choice(key, num_clients, (cohort_size,), replace=False)
        return ids.astype(jnp.int32), jnp.ones((cohort_size,), bool), jnp.zeros((), jnp.int32)

    return CohortSampler(
        sample, cohort_size, float(cohort_size), "fixed", num_clients, cohort_size / num_clients
    )


def poisson(
    num_clients: int, sampling_rate: float, max_cohort_size: int | None = None
) -> CohortSampler:
    """Includes each client independently with probability ``sampling_rate``.

    The cohort is padded to the static ``max_cohort_size`` (default: mean + 8 standard
    deviations, so overflow is astronomically unlikely). If more clients are selected, a
    uniformly random subset of ``max_cohort_size`` is kept and the rest is counted in
    ``overflow`` (the round metrics report it; the run warns).
    """
    _check_population(num_clients)
    q = sampling_rate
    if not isinstance(q, (int, float)) or not (0.0 < q <= 1.0):
        raise ValueError(f"sampling_rate={q!r} must be in (0, 1]; it is the inclusion probability")
    mean = num_clients * q
    if max_cohort_size is None:
        max_cohort_size = min(num_clients, math.ceil(mean + 8.0 * math.sqrt(mean * (1 - q)) + 1))
    if max_cohort_size < 1 or max_cohort_size > num_clients:
        raise ValueError(
            f"max_cohort_size={max_cohort_size} must be in [1, num_clients={num_clients}]"
        )

    def sample(key):
        u = jax.random.uniform(key, (num_clients,))
        neg_u, ids = jax.lax.top_k(-u, max_cohort_size)  # the smallest u: a uniform subset
        mask = -neg_u < q
        overflow = jnp.sum(u < q, dtype=jnp.int32) - jnp.sum(mask, dtype=jnp.int32)
        return ids.astype(jnp.int32), mask, overflow

    return CohortSampler(
        sample, int(max_cohort_size), float(mean), "poisson", num_clients, float(q)
    )


def _check_population(num_clients):
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r} must be a positive integer")
