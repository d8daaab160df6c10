"""Systems heterogeneity: stragglers, clients that drop out after training, a minimum cohort.

Everything here is drawn from the round key and the clients' ids, never from client data, so
the draws are the same on every device and in both forms of the round, and they reveal
nothing about anyone's data. What they change is who uploads and how much each client
trains (:class:`fedjax_dp.contexts.Cohort` fields ``uploaded`` and ``step_budget``).

As in the FedProx paper (Li et al. 2020, "Federated Optimization in Heterogeneous
Networks", Sec. 5.2), a fraction of each round's clients are stragglers: each real client
independently with probability ``straggler_fraction`` (the paper picks exactly that
fraction of the cohort; independent draws keep every client's fate independent of the
others', which the privacy analysis below needs), and a straggler runs a number of local
epochs drawn uniformly from ``{1, ..., E-1}`` (with ``E`` local epochs; with
one epoch or in step mode: a number of local steps uniform in ``{1, ..., S-1}``). FedAvg
drops stragglers (``straggler_policy="drop"``: their uploads never reach the server); FedProx
keeps their partial work (``"partial"``). Independently, each client drops out after
training with probability ``dropout_rate`` (its upload is lost). A round with fewer than
``min_clients`` uploads is skipped: the server state does not change and the round reports
``skipped = 1``.

Privacy. Who straggles or drops out is drawn independently per client from the round key:
under Poisson sampling with rate ``q`` the set of clients whose upload reaches the server is
itself a Poisson sample with rate ``q * upload_probability`` (independent thinning), which is
what the accountant is given. Under fixed-size sampling the accountant keeps the rate
``m / n`` (an upper bound: the thinned sum is, for a fixed cohort, a mixture of Gaussian
mechanisms each with at most the same replace-one sensitivity). A partial straggler's update
is still clipped like any other. Skipping a round depends on the number of uploads: with
fixed-size sampling that number is independent of everyone's data; with Poisson sampling it
reveals the realised cohort size, so ``min_clients`` is refused next to DP noise there.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

POLICIES = ("drop", "partial")
_STRAGGLER, _BUDGET, _DROPOUT = 0, 1, 2


class Systems(NamedTuple):
    """Static description of the systems model (see the module docstring).

    Attributes:
      straggler_fraction: fraction of each round's real clients that straggle, in [0, 1].
      straggler_policy: ``"drop"`` (their uploads are dropped: FedAvg) or ``"partial"``
        (their partial work is aggregated: FedProx).
      dropout_rate: probability that a client's upload is lost after training, in [0, 1).
      min_clients: a round with fewer uploads than this is skipped (0: never).
    """

    straggler_fraction: float = 0.0
    straggler_policy: str = "drop"
    dropout_rate: float = 0.0
    min_clients: int = 0

    @property
    def active(self) -> bool:
        return bool(self.straggler_fraction or self.dropout_rate or self.min_clients)

    @property
    def upload_probability(self) -> float:
        """Expected fraction of a round's real clients whose upload reaches the server."""
        kept = 1.0 - (self.straggler_fraction if self.straggler_policy == "drop" else 0.0)
        return kept * (1.0 - self.dropout_rate)


def systems(
    straggler_fraction: float = 0.0,
    straggler_policy: str = "drop",
    dropout_rate: float = 0.0,
    min_clients: int = 0,
) -> Systems:
    """A validated :class:`Systems`; each error names the argument and its range."""
    for name, v in (("straggler_fraction", straggler_fraction), ("dropout_rate", dropout_rate)):
        if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}={v!r} must be a fraction in [0, 1]")
    if dropout_rate >= 1.0:
        raise ValueError(f"dropout_rate={dropout_rate!r} must be < 1 (1 drops every upload)")
    if straggler_policy not in POLICIES:
        raise ValueError(f"straggler_policy={straggler_policy!r} must be one of {list(POLICIES)}")
    if not isinstance(min_clients, int) or isinstance(min_clients, bool) or min_clients < 0:
        raise ValueError(f"min_clients={min_clients!r} must be an integer >= 0 (0: off)")
    return Systems(float(straggler_fraction), straggler_policy, float(dropout_rate), min_clients)


def draw(
    spec: Systems,
    key: jax.Array,
    ids: jax.Array,
    mask: jax.Array,
    *,
    num_steps: int,
    local_epochs: int | None,
) -> tuple[jax.Array, jax.Array]:
    """Who uploads and how many local steps each client runs.

    Args:
      spec: the systems model.
      key: the round's systems key.
      ids: ``int32[C]`` client ids; mask: ``bool[C]`` real clients.
      num_steps: the client update's static local steps ``S``.
      local_epochs: its epochs ``E`` (None in step mode); ``S`` is a multiple of ``E``.

    Returns:
      ``(uploaded: bool[C], step_budget: int32[C])``; padding slots have ``uploaded=False``.
    """
    full = jnp.full(ids.shape, num_steps, jnp.int32)
    if not spec.active:
        return mask, full
    per = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, ids)

    def uniform(purpose):
        return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, purpose)))(per)

    # Each real client straggles independently with probability straggler_fraction.
    straggler = mask & (uniform(_STRAGGLER) < spec.straggler_fraction)
    v = uniform(_BUDGET)
    if local_epochs is not None and local_epochs >= 2:
        per_epoch = num_steps // local_epochs
        epochs = 1 + jnp.floor(v * (local_epochs - 1)).astype(jnp.int32)  # {1..E-1}
        short = epochs * per_epoch
    else:
        short = 1 + jnp.floor(v * max(num_steps - 1, 1)).astype(jnp.int32)  # {1..S-1}
        short = jnp.minimum(short, num_steps)
    budget = jnp.where(straggler, short, full)
    uploaded = mask & (uniform(_DROPOUT) >= spec.dropout_rate)
    if spec.straggler_policy == "drop":
        uploaded = uploaded & ~straggler
    return uploaded, budget
