"""Privacy auditing in one training run with canary clients (Steinke, Nasr, Jagielski 2023).

The accountant *claims* an epsilon; this module *measures* a lower bound on it. The audit
inserts ``m`` canary clients into the population. Canary ``j`` owns a fixed random unit
direction ``u_j`` in parameter space, and is included in training independently with
probability 1/2 (``S_j = +1``) or not (``S_j = -1``). An included canary, whenever the cohort
sampler picks it (like any client), returns the model delta ``canary_norm * u_j``
(``canary_norm`` = the clip norm by default: a worst-case-sized client that clipping leaves
untouched). After training, each canary is scored by the inner product of ``u_j`` with the
total model change ``final - initial`` (its cosine up to one common factor, so the same
ranking); the auditor guesses "in" for the ``k+`` highest scores, "out" for the ``k-`` lowest
and abstains on the rest.

**The bound** (Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023: their main theorem for (epsilon, delta)-DP, Section 3, and the p-value and
epsilon computation of their appendix, implemented exactly here with numpy). If training is (epsilon, delta)-DP with
respect to the inclusion of each canary, ``r`` guesses are made and ``W`` of them are
correct, then for every ``v``

    P[W >= v] <= f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v],

so observing ``v`` correct guesses rejects (epsilon, delta) at level ``beta`` when the right
side is below ``beta``. :func:`epsilon_lower_bound` returns the smallest epsilon that is not
rejected (scanning epsilon upward, so the bound stays valid even where the right side is not
monotone in epsilon). With ``delta = 0`` it is the binomial tail alone.

**Choosing k+ and k-.** :func:`guess_grid` fixes, in advance, a small grid of ``(k+, k-)``
pairs: ``(k, k)`` and ``(k, 0)`` for ``k`` = 2%, 5%, 10%, 20%, 50% of ``m``. Each pair is
tested at level ``beta / G`` for the ``G`` pairs of the grid (Bonferroni), so the best of the
grid is a lower bound that holds with probability at least ``1 - beta`` overall.

**Neighbouring relation.** An excluded canary is not removed from the population: it stays a
client that the sampler can pick, and it returns a zero delta. For DP-FedAvg with Poisson
sampling this is the same output distribution as an absent canary (add/remove one client,
the relation the accountant uses): the clipped sum is unchanged by a zero delta, the noise
does not depend on the cohort, and the sum is divided by the PUBLIC expected cohort size
``q * population``, which does not depend on who is included. Only the per-round metrics
(cohort count, training loss) could tell, and they are not part of the audited output (the
model). With fixed-size sampling a zero-delta canary still takes a cohort slot; the pair is
then "replace one client by a client with a zero delta", the replace-one relation, which the
run's default add/remove accounting does not cover: :func:`audited_round_privacy` accounts
fixed-size audits under ``relation="replace_one_user"`` (RDP only; ``accountant="pld"`` is
refused with a message), every released run of the audit alike. (A stage whose output depends
on the number of participants, e.g. a noisy count of clipped clients, would break the Poisson
equivalence.)

**What it measures, and its limits.** A one-run audit gives a LOWER bound that holds with
probability ``1 - beta``: a bound above the accounted epsilon means the claim is false (a bug
in the noise, clipping or accounting); a bound far below it proves nothing about tightness.
It is loose: only the final model is seen (not each round's update), other canaries and real
training add interference (about ``sqrt(m / 2 / P)`` of a canary's signal for ``P``
parameters), and with ``m`` canaries it can never exceed about ``log(r / log(G / beta))``
(perfect guesses), e.g. about 3.5 for 200 guesses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp.core import base
from fedjax_dp.core import hparams as hparams_lib
from fedjax_dp.core.client import ClientUpdate
from fedjax_dp.data import FederatedData

#: Fractions of ``m`` used for ``k`` in :func:`guess_grid`.
GUESS_FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5)

#: Fault injections for :func:`fault_hparams` (checks that the audit catches a broken run).
FAULTS = ("none", "noise_div_10", "no_clipping")

_DIRECTION, _INCLUSION = 0, 1
_EPS_STEP = 0.02  # scan step of epsilon_lower_bound before bisection
_EPS_MAX = 60.0


# ----------------------------------------------------------------------------- the bound


def _log_binomial_pmf(r: int, log_q: float, log_1mq: float) -> np.ndarray:
    """``log P[Binomial(r, q) = k]`` for ``k = 0..r`` (float64)."""
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, r + 1, dtype=np.float64)))])
    k = np.arange(r + 1, dtype=np.float64)
    return log_fact[r] - log_fact[: r + 1] - log_fact[r::-1] + k * log_q + (r - k) * log_1mq


def p_value(
    num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float
) -> float:
    """Probability of at least ``num_correct`` correct guesses if training is (eps, delta)-DP.

    The main theorem of Steinke, Nasr, Jagielski (2023) for (epsilon, delta)-DP: with
    ``m = num_canaries`` canaries each included with probability 1/2, ``r = num_guesses``
    guesses, ``v = num_correct`` and ``f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]``, the
    returned value is
    ``min(1, f(v) + 2 m delta max_{1<=i<=v} (f(v-i) - f(v)) / i)``.

    Args:
      num_canaries: ``m``, the number of canaries (included or not).
      num_guesses: ``r <= m``, guesses made (abstentions excluded).
      num_correct: ``v <= r``, correct guesses.
      epsilon: the claimed epsilon, ``>= 0``.
      delta: the claimed delta, in ``[0, 1]``.

    Returns:
      The p-value of the claim (a float in ``[0, 1]``).

    Examples:
      >>> round(p_value(10, 10, 10, 0.0, 0.0), 6)  # 10 coin flips all right: 2^-10
      0.000977
    """
    m, r, v = int(num_canaries), int(num_guesses), int(num_correct)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= num_correct={v} <= num_guesses={r} <= num_canaries={m}")
    if not epsilon >= 0:
        raise ValueError(f"epsilon={epsilon!r} must be >= 0")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta={delta!r} must be in [0, 1]")
    if v == 0:
        return 1.0
    eps = float(epsilon)
    # log q and log(1 - q) for q = e^eps / (1 + e^eps), stable for large eps.
    log_q, log_1mq = -np.logaddexp(0.0, -eps), -np.logaddexp(0.0, eps)
    pmf = np.exp(_log_binomial_pmf(r, log_q, log_1mq))
    tail = float(np.sum(pmf[v:][::-1]))  # f(v), summed from the small end
    if delta == 0:
        return min(tail, 1.0)
    # f(v - i) - f(v) = P[v - i <= Binomial < v], i = 1..v
    below = np.cumsum(pmf[v - 1 :: -1])
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * float(delta) * alpha, 1.0)


def epsilon_lower_bound(
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    *,
    delta: float,
    significance: float = 0.05,
) -> float:
    """The empirical epsilon lower bound of one guess outcome (Steinke et al. 2023).

    The smallest ``eps >= 0`` at which :func:`p_value` is no longer below ``significance``:
    every smaller epsilon is rejected, so if training were (eps', delta)-DP with ``eps'``
    below the returned value, this outcome would have had probability ``< significance``.
    Epsilon is scanned upward in steps of 0.02 and then bisected, so the first crossing is
    found even where the p-value is not monotone in epsilon.

    Args:
      num_canaries: ``m``.
      num_guesses: ``r``.
      num_correct: ``v``.
      delta: the claimed delta (``0`` gives the pure binomial bound).
      significance: ``beta`` in ``(0, 1)``; the bound holds with probability ``1 - beta``.

    Returns:
      The lower bound (``0.0`` when nothing is rejected).

    Examples:
      >>> epsilon_lower_bound(100, 20, 10, delta=0.0)  # a coin's accuracy proves nothing
      0.0
    """
    if not 0 < significance < 1:
        raise ValueError(f"significance={significance!r} must be in (0, 1), e.g. 0.05")

    def rejected(eps):
        return p_value(num_canaries, num_guesses, num_correct, eps, delta) < significance

    if not rejected(0.0):
        return 0.0
    lo = 0.0
    while rejected(lo + _EPS_STEP):
        lo += _EPS_STEP
        if lo >= _EPS_MAX:
            return lo
    hi = lo + _EPS_STEP
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def guess_grid(num_canaries: int) -> list[tuple[int, int]]:
    """The ``(k+, k-)`` pairs tried by :func:`best_guess` (fixed before seeing scores).

    ``(k, k)`` and ``(k, 0)`` for ``k = round(f * m)`` (at least 1) and ``f`` in
    :data:`GUESS_FRACTIONS`, without duplicates, keeping ``k+ + k- <= m``.
    """
    m = int(num_canaries)
    if m < 1:
        raise ValueError(f"num_canaries={num_canaries!r} must be >= 1")
    out: list[tuple[int, int]] = []
    for f in GUESS_FRACTIONS:
        k = max(1, round(f * m))
        for pair in ((k, k), (k, 0)):
            if sum(pair) <= m and pair not in out:
                out.append(pair)
    return out


@dataclasses.dataclass(frozen=True)
class GuessResult:
    """The outcome of guessing canary membership from scores.

    Attributes:
      epsilon_lower_bound: the best bound over the grid (each pair at ``significance / G``).
      k_plus, k_minus: the pair that gave it.
      num_guesses, num_correct: ``r = k+ + k-`` and the correct guesses of that pair.
      significance: the overall ``beta``.
      grid: one dict per pair: ``k_plus``, ``k_minus``, ``num_correct``,
        ``epsilon_lower_bound``.
    """

    epsilon_lower_bound: float
    k_plus: int
    k_minus: int
    num_guesses: int
    num_correct: int
    significance: float
    grid: list[dict[str, Any]]


def best_guess(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    delta: float,
    significance: float = 0.05,
    grid: Sequence[tuple[int, int]] | None = None,
) -> GuessResult:
    """Guesses "in" for the ``k+`` highest scores and "out" for the ``k-`` lowest.

    Args:
      scores: ``f[m]``, higher meaning "more likely included".
      included: ``bool[m]``, the truth.
      delta: the claimed delta.
      significance: overall ``beta``; each of the ``G`` grid pairs is tested at ``beta / G``
        (Bonferroni), so the returned maximum holds with probability ``1 - beta``.
      grid: the ``(k+, k-)`` pairs; default :func:`guess_grid`. Fix it before looking at
        the scores.

    Returns:
      A :class:`GuessResult`.
    """
    scores = np.asarray(scores, np.float64)
    included = np.asarray(included, bool)
    m = len(scores)
    if scores.shape != (m,) or included.shape != (m,) or m == 0:
        raise ValueError(
            f"scores {scores.shape} and included {included.shape} must be non-empty 1-D "
            "arrays of the same length"
        )
    pairs = list(guess_grid(m) if grid is None else grid)
    if not pairs:
        raise ValueError("grid is empty; pass at least one (k_plus, k_minus) pair")
    order = np.argsort(-scores, kind="stable")  # highest first
    truth = included[order]
    level = significance / len(pairs)
    rows = []
    for kp, km in pairs:
        kp, km = int(kp), int(km)
        if kp < 0 or km < 0 or kp + km > m:
            raise ValueError(f"(k_plus, k_minus)=({kp}, {km}) must be >= 0 with sum <= {m}")
        correct = int(np.sum(truth[:kp])) + int(np.sum(~truth[m - km :]))
        eps = epsilon_lower_bound(m, kp + km, correct, delta=delta, significance=level)
        rows.append(
            {"k_plus": kp, "k_minus": km, "num_correct": correct, "epsilon_lower_bound": eps}
        )
    best = max(rows, key=lambda row: row["epsilon_lower_bound"])
    return GuessResult(
        epsilon_lower_bound=best["epsilon_lower_bound"],
        k_plus=best["k_plus"],
        k_minus=best["k_minus"],
        num_guesses=best["k_plus"] + best["k_minus"],
        num_correct=best["num_correct"],
        significance=float(significance),
        grid=rows,
    )


# ----------------------------------------------------------------------------- canaries


def canary_direction(key: jax.Array, index: jax.Array, params: base.PyTree) -> base.PyTree:
    """The unit direction (global L2 norm 1, float32 leaves) of canary ``index``.

    A deterministic function of ``(key, index)`` and the shapes of ``params``: one standard
    normal vector over all ``P`` parameters (uniform on the sphere once normalised), cut into
    the leaves. One draw rather than one per leaf: it compiles several times faster under
    ``vmap``.
    """
    k = jax.random.fold_in(jax.random.fold_in(key, _DIRECTION), index)
    leaves, treedef = jax.tree.flatten(params)
    sizes = [math.prod(jnp.shape(x)) for x in leaves]
    flat = jax.random.normal(k, (sum(sizes),), jnp.float32)
    flat = flat / jnp.linalg.norm(flat)
    cuts = np.cumsum(sizes)[:-1].tolist()
    parts = jnp.split(flat, cuts) if cuts else [flat]
    return jax.tree.unflatten(
        treedef, [part.reshape(jnp.shape(x)) for part, x in zip(parts, leaves)]
    )


def canary_included(key: jax.Array, index: jax.Array) -> jax.Array:
    """Whether canary ``index`` is included (``bool[]``, probability 1/2, independent)."""
    return jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, _INCLUSION), index))


def add_canaries(
    client: ClientUpdate, *, num_real_clients: int, num_canaries: int, key: jax.Array
) -> ClientUpdate:
    """Wraps a client update so that clients ``>= num_real_clients`` are canaries.

    Client ``num_real_clients + j`` returns ``hparams["canary_norm"] * u_j`` if canary ``j``
    is included (:func:`canary_included`) and a zero delta otherwise (see the module
    docstring for why that equals an absent client under DP-FedAvg); ``u_j`` is
    :func:`canary_direction`. Its metrics are zero (it is left out of the training loss).
    Real clients are untouched. Pass it to
    :func:`fedjax_dp.build_simulation` as ``wrap_client``, with the population extended by
    :func:`with_canary_clients`.

    Args:
      client: the config's :class:`~fedjax_dp.ClientUpdate`.
      num_real_clients: ``K``, the real population size.
      num_canaries: ``m``.
      key: the canary key: it fixes the directions and which canaries are included.

    Returns:
      A :class:`~fedjax_dp.ClientUpdate` with the same schedule.
    """
    if num_canaries < 1:
        raise ValueError(f"num_canaries={num_canaries!r} must be >= 1")
    real = client.update

    def update(params, data, ctx, hparams):
        result = real(params, data, ctx, hparams)
        delta, metrics = result.upload["delta"], result.metrics
        j = ctx.client_id - num_real_clients
        is_canary = j >= 0
        j = jnp.clip(j, 0, num_canaries - 1)
        scale = jnp.where(
            canary_included(key, j), jnp.asarray(hparams["canary_norm"], jnp.float32), 0.0
        )
        u = canary_direction(key, j, params)
        canary = jax.tree.map(lambda d, x: (scale * x).astype(d.dtype), delta, u)
        delta = base.tree_where(is_canary, canary, delta)
        metrics = {k: jnp.where(is_canary, jnp.zeros_like(v), v) for k, v in metrics.items()}
        return result._replace(upload={**result.upload, "delta": delta}, metrics=metrics)

    norm = hparams_lib.HParam(
        "canary_norm",
        0.0,
        hparams_lib.NONNEGATIVE,
        "norm of an included canary's delta (0: absent)",
    )
    return client._replace(update=update, hparams=(*client.hparams, norm))


def with_canary_clients(data: FederatedData, num_canaries: int) -> FederatedData:
    """``data`` plus ``num_canaries`` clients of one all-zero example each (label 0), last.

    The canaries' data is never used (:func:`add_canaries` replaces their update); it only
    gives them a place in the population, so the sampler picks them like any client.
    """
    if num_canaries < 1:
        raise ValueError(f"num_canaries={num_canaries!r} must be >= 1")
    x = np.asarray(data.x)
    y = np.asarray(data.y)
    n = x.shape[0]
    names = data.client_names
    if names is not None:
        names = tuple(names) + tuple(f"canary_{j}" for j in range(num_canaries))
    return FederatedData(
        x=np.concatenate([x, np.zeros((num_canaries, *x.shape[1:]), x.dtype)]),
        y=np.concatenate([y, np.zeros((num_canaries,), y.dtype)]),
        offsets=np.concatenate(
            [np.asarray(data.offsets), n + np.arange(num_canaries, dtype=np.int32)]
        ).astype(np.int32),
        counts=np.concatenate([np.asarray(data.counts), np.ones((num_canaries,), np.int32)]).astype(
            np.int32
        ),
        num_classes=data.num_classes,
        max_count=data.max_count,
        client_names=names,
    )


def canary_scores(
    key: jax.Array, change: base.PyTree, num_canaries: int, *, batch_size: int = 64
) -> np.ndarray:
    """``<u_j, change>`` for every canary ``j`` (``f64[m]`` on the host).

    ``change`` is the total model change (final minus initial parameters).
    """
    return np.asarray(_scores(key, change, num_canaries, batch_size), np.float64)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _scores(key, change, num_canaries, batch_size):
    change = jax.tree.map(lambda x: x.astype(jnp.float32), change)

    def one(j):
        u = canary_direction(key, j, change)
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(change)))

    return jax.lax.map(one, jnp.arange(num_canaries), batch_size=min(batch_size, num_canaries))


def all_included(key: jax.Array, num_canaries: int) -> np.ndarray:
    """``bool[m]``: which canaries :func:`add_canaries` includes for ``key``."""
    return np.asarray(_all_included(key, jnp.arange(num_canaries)), bool)


_all_included = jax.jit(jax.vmap(canary_included, in_axes=(None, 0)))


def fault_hparams(fault: str, hparams: dict[str, float]) -> tuple[dict[str, float], float]:
    """Training hparams and canary norm that simulate a broken DP run (for checking audits).

    The accountant keeps claiming ``hparams``; training uses the returned ones:

    - ``"none"``: the run as configured; canaries at the clip norm.
    - ``"noise_div_10"``: the noise multiplier divided by 10.
    - ``"no_clipping"``: no effective clipping (clip norm x 10^4) with the noise standard
      deviation kept at ``sigma * clip_norm`` (noise multiplier / 10^4), and canaries at 30x
      the claimed clip norm: a run whose noise is calibrated to a bound it never enforces.

    Returns:
      ``(train_hparams, canary_norm)``.
    """
    if fault not in FAULTS:
        raise ValueError(f"fault={fault!r} must be one of {list(FAULTS)}")
    hp = {k: float(v) for k, v in hparams.items()}
    clip = hp["clip_norm"]
    if fault == "noise_div_10":
        hp["noise_multiplier"] = hp["noise_multiplier"] / 10.0
    elif fault == "no_clipping":
        hp["clip_norm"] = clip * 1e4
        hp["noise_multiplier"] = hp["noise_multiplier"] / 1e4
        return hp, 30.0 * clip
    return hp, clip


# ----------------------------------------------------------------------------- the audit


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """What :func:`canary_audit` measured.

    Attributes:
      epsilon_lower_bound: the audited lower bound (probability ``1 - significance``).
      accounted_epsilon: what the accountant claims for the audited run (the claimed
        hparams, the population with canaries, ``rounds`` rounds) at ``delta``.
      delta: the delta of both.
      guess: the :class:`GuessResult` (``k+``, ``k-``, correct guesses, the grid).
      num_canaries, num_included: ``m`` and how many of them were included.
      num_real_clients: the real population.
      rounds: rounds trained.
      scores: ``f64[m]`` canary scores; ``included``: ``bool[m]`` the truth.
      params: the final model parameters (host arrays).
      claimed_hparams, train_hparams: what the accountant assumed / what training used.
      canary_norm: the L2 norm of an included canary's delta.
      server_lr_factor: the server learning rate was multiplied by this (``(K + m) / K``
        with Poisson sampling, see :func:`build_canary_auditor`; else 1).
    """

    epsilon_lower_bound: float
    accounted_epsilon: float
    delta: float
    guess: GuessResult
    num_canaries: int
    num_included: int
    num_real_clients: int
    rounds: int
    scores: np.ndarray
    included: np.ndarray
    params: Any
    claimed_hparams: dict[str, float]
    train_hparams: dict[str, float]
    canary_norm: float
    server_lr_factor: float = 1.0

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable summary (no scores, no parameters)."""
        g = self.guess
        return {
            "accounted_epsilon": self.accounted_epsilon,
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "delta": self.delta,
            "significance": g.significance,
            "num_canaries": self.num_canaries,
            "num_included": self.num_included,
            "num_real_clients": self.num_real_clients,
            "rounds": self.rounds,
            "k_plus": g.k_plus,
            "k_minus": g.k_minus,
            "num_guesses": g.num_guesses,
            "num_correct": g.num_correct,
            "canary_norm": self.canary_norm,
            "server_lr_factor": self.server_lr_factor,
            "claimed_hparams": self.claimed_hparams,
            "train_hparams": self.train_hparams,
            "grid": g.grid,
        }


@dataclasses.dataclass(frozen=True)
class CanaryAuditor:
    """A compiled simulation with ``m`` canary clients, ready to train and audit.

    Build it with :func:`build_canary_auditor`; :meth:`run` trains and audits. Hyper-parameters
    are traced, so several runs (a sweep of noise multipliers, a fault injection) share one
    compilation. All runs share the same canaries (directions and inclusion).

    Attributes:
      sim: the :class:`~fedjax_dp.Simulation` on the population with canaries.
      data: that population on the device (real clients first, then canaries).
      num_real_clients: ``K``.
      num_canaries: ``m``.
      canary_key: fixes the canary directions and which canaries are included.
    """

    sim: Any
    data: FederatedData
    num_real_clients: int
    num_canaries: int
    canary_key: jax.Array

    def run(
        self,
        *,
        rounds: int,
        key: jax.Array,
        delta: float,
        significance: float = 0.05,
        claimed_hparams: dict[str, float] | None = None,
        train_hparams: dict[str, float] | None = None,
        canary_norm: float | None = None,
        accountant: str = "rdp",
        conversion: str = "improved",
        progress=None,
        callbacks: Sequence[Any] = (),
    ) -> AuditResult:
        """Trains ``rounds`` rounds from ``key`` and audits the result.

        Args:
          rounds: rounds to train.
          key: initialisation, sampling and noise.
          delta: delta of the accounted epsilon and of the bound.
          significance: ``beta``: the lower bound holds with probability ``1 - beta``.
          claimed_hparams: overrides of the config's hparams that the accountant is told
            (e.g. ``{"noise_multiplier": 2.0}``).
          train_hparams: full hparams training uses (default: the claimed ones); differ only
            to simulate a broken run (:func:`fault_hparams`).
          canary_norm: L2 norm of an included canary's delta (default: the training clip
            norm).
          accountant, conversion: see :class:`fedjax_dp.accounting.Accountant`.
          progress: optional ``callable(round_index)`` called after each round is dispatched.
          callbacks: :class:`fedjax_dp.runner.loop.Callback` s of the training loop
            (:func:`fedjax_dp.runner.loop.train_loop`), e.g. a progress bar.

        Returns:
          An :class:`AuditResult`.
        """
        from fedjax_dp.privacy import accounting  # host side only
        from fedjax_dp.runner import loop

        if int(rounds) != rounds or rounds < 1:
            raise ValueError(f"rounds={rounds!r} must be a positive integer")
        sim, m = self.sim, self.num_canaries
        claimed = {k: float(v) for k, v in sim.make_hparams(**(claimed_hparams or {})).items()}
        train = dict(claimed if train_hparams is None else train_hparams)
        norm = float(train["clip_norm"] if canary_norm is None else canary_norm)
        lr_factor = 1.0
        if sim.sampler.sampling == "poisson":
            # The public denominator q * (K + m) counts the canaries; rescale the server step
            # so that real clients move the model as in the run without canaries (q * K):
            # exact for the SGD server optimizer, approximate for adaptive ones (which
            # normalise the step). Post-processing of the noisy sum: privacy is unchanged.
            lr_factor = (self.num_real_clients + m) / self.num_real_clients
        hparams = {k: float(v) for k, v in train.items()}
        hparams.update(server_lr=hparams["server_lr"] * lr_factor, canary_norm=norm)
        hparams = {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()}

        audited = audited_round_privacy(sim.round_privacy(claimed))
        if accountant == "pld" and any(rp.relation == "replace_one_user" for rp in audited):
            raise ValueError(
                "accountant='pld': a fixed-size canary audit is accounted under replace-one "
                "(a zero-delta canary keeps its cohort slot), which only the RDP accountant "
                "analyses; use accountant='rdp' (privacy.accountant=rdp) or "
                "sampling='poisson'"
            )
        acct = accounting.Accountant(delta=delta, accountant=accountant, conversion=conversion)
        for rp in audited:
            acct.compose(rp, int(rounds))
        accounted = acct.epsilon()

        init_key, train_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
        state = sim.init(init_key)
        initial = jax.device_get(state.params)

        def step(state, r):
            return sim.round_fn(state, self.data, hparams, jax.random.fold_in(train_key, r))

        hooks = list(callbacks)
        if progress is not None:

            class EachRound(loop.Callback):
                def on_round_end(self, done, state, metrics):
                    progress(done - 1)

            hooks.append(EachRound())
        state = loop.train_loop(step, state, rounds=int(rounds), callbacks=hooks)
        final = jax.device_get(state.params)
        change = jax.tree.map(lambda a, b: np.asarray(a, np.float32) - b, final, initial)
        scores = canary_scores(self.canary_key, change, m)
        included = all_included(self.canary_key, m)
        guess = best_guess(scores, included, delta=delta, significance=significance)
        return AuditResult(
            epsilon_lower_bound=guess.epsilon_lower_bound,
            accounted_epsilon=float(accounted),
            delta=float(delta),
            guess=guess,
            num_canaries=m,
            num_included=int(included.sum()),
            num_real_clients=self.num_real_clients,
            rounds=int(rounds),
            scores=scores,
            included=included,
            params=final,
            claimed_hparams=claimed,
            train_hparams=train,
            canary_norm=norm,
            server_lr_factor=lr_factor,
        )


def audited_round_privacy(rounds: Sequence[Any]) -> list[Any]:
    """The rounds of an audited run under the relation its canary pair actually is.

    With Poisson sampling an excluded canary (a zero delta) is distributed as an absent one,
    so the run's add/remove accounting applies unchanged. With fixed-size sampling the canary
    keeps its cohort slot: the pair is replace-one, and the rounds are accounted with
    ``relation="replace_one_user"`` (module docstring, "Neighbouring relation").

    Args:
      rounds: :class:`fedjax_dp.accounting.RoundPrivacy` of one round of the run.

    Returns:
      The same rounds, fixed-size user-level ones under ``"replace_one_user"``.
    """
    return [
        dataclasses.replace(rp, relation="replace_one_user")
        if rp.sampling == "fixed" and rp.unit == "user" and rp.mechanism == "gaussian"
        else rp
        for rp in rounds
    ]


def build_canary_auditor(
    config, model, data: FederatedData, *, num_canaries: int, key: jax.Array
) -> CanaryAuditor:
    """The configured run plus ``num_canaries`` canary clients, compiled once.

    Same engine as the configured run: :func:`fedjax_dp.build_simulation` on ``data`` plus
    ``m`` canary clients (:func:`with_canary_clients`), its client update wrapped by
    :func:`add_canaries`; canaries are sampled like any client. The population grows by
    ``m``. With Poisson sampling the rate ``q``, hence the accounted epsilon, is unchanged, but
    the public denominator ``q * (K + m)`` grows: :meth:`CanaryAuditor.run` multiplies the
    server learning rate by ``(K + m) / K`` so that real clients move the model as in the run
    without canaries (exactly with the SGD server optimizer; adaptive ones largely normalise
    the step already), a rescaling of the released noisy sum: post-processing, privacy
    unchanged. With fixed-size sampling canaries take cohort slots from real clients.

    Args:
      config: an :class:`~fedjax_dp.AlgorithmConfig` with user-level DP (``dp_fedavg``).
      model: the :class:`~fedjax_dp.Model`.
      data: the real clients (host :class:`~fedjax_dp.FederatedData`).
      num_canaries: ``m``: hundreds to thousands (the bound cannot exceed about
        ``log(m)``), at most a small fraction of the number of parameters (interference).
      key: the canary key (directions and inclusion).

    Returns:
      A :class:`CanaryAuditor`.
    """
    from fedjax_dp.core.algorithms import build_simulation, resolve

    config = resolve(config)
    if not config.user_dp or config.example_dp:
        raise ValueError(
            f"the canary audit checks user-level DP (a canary is a client); algorithm "
            f"{config.name!r} is not user-level DP-FedAvg: use name='dp_fedavg'"
        )
    unsupported = [
        f"{name}={getattr(config, name)!r}"
        for name, default in (
            ("mechanism", "gaussian"),
            ("adaptive_clipping", False),
            ("layer_clip_norms", None),
        )
        if getattr(config, name, default) not in (default, "")
    ]
    if unsupported:
        raise ValueError(
            f"the canary audit supports DP-FedAvg with one fixed clip norm and central "
            f"Gaussian noise; unset {', '.join(unsupported)}"
        )
    if int(num_canaries) != num_canaries or num_canaries < 1:
        raise ValueError(f"num_canaries={num_canaries!r} must be a positive integer")
    m, k_real = int(num_canaries), data.num_clients
    population = with_canary_clients(data, m)
    sim = build_simulation(
        config,
        model,
        population,
        wrap_client=lambda c: add_canaries(c, num_real_clients=k_real, num_canaries=m, key=key),
    )
    return CanaryAuditor(sim, population.to_device(), k_real, m, key)


def canary_audit(
    config,
    model,
    data: FederatedData,
    *,
    num_canaries: int,
    rounds: int,
    key: jax.Array,
    delta: float,
    **run_kwargs: Any,
) -> AuditResult:
    """Trains ``config`` with ``num_canaries`` canary clients and audits its epsilon.

    :func:`build_canary_auditor` (canary key ``fold_in(key, 0)``) then
    :meth:`CanaryAuditor.run` (key ``fold_in(key, 1)``); ``run_kwargs`` go to ``run``.

    Examples:
      >>> import jax, fedjax_dp
      >>> data = fedjax_dp.data.synthetic_classification(
      ...     num_clients=5, examples_per_client=4, feature_shape=(16,), num_classes=4)
      >>> model = fedjax_dp.get_model("logistic", (16,), 4)
      >>> config = fedjax_dp.AlgorithmConfig(
      ...     name="dp_fedavg", sampling="poisson", sampling_rate=0.5, batch_size=4,
      ...     noise_multiplier=2.0)
      >>> result = canary_audit(config, model, data, num_canaries=50, rounds=2,
      ...                       key=jax.random.key(0), delta=1e-5)
      >>> result.epsilon_lower_bound <= result.accounted_epsilon
      True
    """
    auditor = build_canary_auditor(
        config, model, data, num_canaries=num_canaries, key=jax.random.fold_in(key, 0)
    )
    return auditor.run(rounds=rounds, key=jax.random.fold_in(key, 1), delta=delta, **run_kwargs)


# ----------------------------------------------------------------------------- the command


def run_audit(cfg, *, write: bool = True, log=print) -> list[dict[str, Any]]:
    """``fedjax-dp audit``: audits the experiment ``cfg`` (one row per noise multiplier).

    Builds the configured run with ``cfg.audit.canaries`` canaries (compiled once), then for
    each noise multiplier of ``cfg.audit.noise_multipliers`` (default: the algorithm's)
    trains ``cfg.run.rounds`` rounds and reports the accounted epsilon, the audited lower
    bound and the guesses. With ``privacy.attack`` it also runs the configured run itself
    (:func:`fedjax_dp.experiment.run`, no canaries, no fault) at that noise multiplier and
    reports its loss-threshold membership attack and test accuracy; both runs train on the
    same held-in clients. ``cfg.audit.fault`` simulates a broken run (:func:`fault_hparams`)
    in the canary run. Prints a table and writes ``cfg.audit.output`` (default
    ``<run.output_dir>/audit.json``).

    Every run trains on the same clients and releases its model, so the audit as a whole
    releases all of them: the table's footer, the log and the JSON's ``privacy`` block
    (:func:`composition`) give the epsilon of releasing every run together next to each
    row's own accounted epsilon.

    Returns:
      The rows (dicts), as written to the JSON.
    """
    import contextlib
    import io
    import json
    import pathlib

    from fedjax_dp.core.evaluation import evaluate
    from fedjax_dp.runner import experiment, loop

    experiment._check(cfg)
    a, p = cfg.audit, cfg.privacy
    for name, off in (
        ("target_epsilon", 0.0),
        ("noise_schedule", "constant"),
        ("noise_cohort_size", 0),
    ):
        if getattr(p, name, off) != off:
            raise ValueError(
                f"privacy.{name}={getattr(p, name)!r}: the audit runs a constant noise "
                f"multiplier (set the values to audit with --audit.noise_multipliers); unset it"
            )
    if a.fault not in FAULTS:
        raise ValueError(f"audit.fault={a.fault!r} must be one of {list(FAULTS)}")
    if not 0 < a.significance < 1:
        raise ValueError(f"audit.significance={a.significance} must be in (0, 1), e.g. 0.05")
    if a.canaries < 1:
        raise ValueError(f"audit.canaries={a.canaries} must be >= 1")
    try:
        sigmas = [float(v) for v in a.noise_multipliers.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(
            f"audit.noise_multipliers={a.noise_multipliers!r} must be comma-separated numbers, "
            "e.g. 0,0.5,1,2"
        ) from None
    train, (x_test, y_test) = experiment.load_data(cfg)
    train, held_out = experiment.attack_split(cfg, train)
    model = experiment.make_model(cfg, train.feature_shape, train.num_classes)
    root = jax.random.key(cfg.run.seed)
    auditor = build_canary_auditor(
        experiment.algorithm_config(cfg),
        model,
        train,
        num_canaries=a.canaries,
        key=jax.random.fold_in(root, 2),
    )
    sim = auditor.sim
    if not sigmas:
        sigmas = [float(sim.config.noise_multiplier)]
    log(
        f"audit: {sim.config.name} on {train.num_clients} clients + {a.canaries} canaries "
        f"({sim.sampler.sampling} cohort ~{sim.sampler.expected_cohort_size:g}), "
        f"{cfg.run.rounds} rounds, fault {a.fault}"
        + (f", {held_out.num_clients} clients held out for the attack" if held_out else "")
    )
    rows = []
    releases: list[tuple[float, list[tuple[Any, int]]]] = []  # (sigma, that run's rounds)
    for sigma in sigmas:
        claimed = {k: float(v) for k, v in sim.make_hparams(noise_multiplier=sigma).items()}
        audited = audited_round_privacy(sim.round_privacy(claimed))
        releases.append((sigma, [(rp, cfg.run.rounds) for rp in audited]))
        train_hp, canary_norm = fault_hparams(a.fault, claimed)
        with loop.Progress(cfg.run.rounds, enabled=cfg.run.progress) as bar:
            result = auditor.run(
                rounds=cfg.run.rounds,
                key=jax.random.fold_in(root, 3),
                delta=p.delta,
                significance=a.significance,
                claimed_hparams=claimed,
                train_hparams=train_hp,
                canary_norm=canary_norm,
                accountant=p.accountant,
                conversion=p.conversion,
                callbacks=[bar],
            )
        row = {"noise_multiplier": sigma, **result.summary()}
        row["audit_test_accuracy"] = evaluate(model, result.params, x_test, y_test)["accuracy"]
        if held_out is not None:
            run_cfg = dataclasses.replace(
                cfg,
                algorithm=dataclasses.replace(cfg.algorithm, noise_multiplier=sigma),
                run=dataclasses.replace(cfg.run, progress=False),
            )
            with contextlib.redirect_stdout(io.StringIO()):  # its per-evaluation lines
                attacked = experiment.run(run_cfg, write=False, log=lambda *_: None)
            final = attacked.final
            attack_rounds = [pair for s in attacked.schedules.values() for pair in s]
            # One relation for everything the audit releases (fixed size: replace-one).
            relations = audited_round_privacy([rp for rp, _ in attack_rounds])
            releases.append(
                (sigma, [(rp, n) for rp, (_, n) in zip(relations, attack_rounds, strict=True)])
            )
            row["test_accuracy"] = final["test_accuracy"]
            row.update({k: v for k, v in final.items() if k.startswith("attack_")})
        rows.append(row)
        g = result.guess
        log(
            f"  noise multiplier {sigma:g}: accounted epsilon {_eps(result.accounted_epsilon)}"
            f", audited lower bound {result.epsilon_lower_bound:.3f} ({g.num_correct}/"
            f"{g.num_guesses} correct guesses, k+={g.k_plus}, k-={g.k_minus})"
            + (f", attack AUC {row['attack_auc']:.3f}" if held_out is not None else "")
        )
    privacy = composition(releases, cfg)
    log("")
    log(format_table(rows, delta=p.delta, significance=a.significance, privacy=privacy))
    if write:
        out = pathlib.Path(a.output or pathlib.Path(cfg.run.output_dir) / "audit.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"config": experiment.to_dict(cfg), "privacy": privacy, "rows": rows}
        out.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {out}")
    return rows


def composition(releases: Sequence[tuple[float, Sequence[tuple[Any, int]]]], cfg) -> dict:
    """What the audit's epsilons cover, and the epsilon of releasing all its runs together.

    Args:
      releases: one ``(noise multiplier, rounds)`` pair per run the audit trained and released
        (a canary run per noise multiplier, plus the attack's run with ``privacy.attack``),
        ``rounds`` being ``(RoundPrivacy, count)`` pairs as that run's accountant composed
        them (claimed, with ``audit.fault``).
      cfg: the experiment config (delta, accountant, conversion, fault).

    Returns:
      ``neighboring_relation``, ``runs``, ``epsilon_all_runs`` (every run's rounds in one
      :class:`fedjax_dp.accounting.Accountant`; ``inf`` if a run is non-private, e.g. noise
      multiplier 0) and, when some runs are non-private, ``private_runs`` and
      ``epsilon_private_runs`` (the runs with a positive noise multiplier), plus ``delta``,
      ``accountant``, ``conversion``, ``fault``.
    """
    from fedjax_dp import privacy

    p = cfg.privacy
    every = [pair for _, rounds in releases for pair in rounds]
    private = [pair for sigma, rounds in releases if sigma > 0 for pair in rounds]
    out: dict[str, Any] = {
        "neighboring_relation": every[0][0].neighboring_relation if every else None,
        "delta": p.delta,
        "accountant": p.accountant,
        "conversion": p.conversion,
        "fault": cfg.audit.fault,
        "runs": len(releases),
        "epsilon_all_runs": privacy.composed_epsilon(every, p),
    }
    n_private = sum(sigma > 0 for sigma, _ in releases)
    if n_private < len(releases):
        out["private_runs"] = n_private
        out["epsilon_private_runs"] = privacy.composed_epsilon(private, p) if private else None
    return out


def composition_footer(privacy: dict[str, Any]) -> str:
    """One paragraph: the epsilon of releasing all the audit's runs together."""
    text = (
        f"Releasing all {privacy['runs']} runs of this audit together (same clients; delta="
        f"{privacy['delta']:g}, {privacy['accountant']}, {privacy['neighboring_relation']}): "
        f"epsilon = {_eps(privacy['epsilon_all_runs'])}"
    )
    if "private_runs" in privacy:
        eps = privacy["epsilon_private_runs"]
        text += (
            " (a run with noise multiplier 0 is among them); the "
            f"{privacy['private_runs']} runs with noise: epsilon = "
            + ("-" if eps is None else _eps(eps))
        )
    text += ". Each row's accounted epsilon is one canary run alone"
    if privacy.get("fault", "none") != "none":
        text += f" (as claimed: audit.fault = {privacy['fault']} trains with less privacy)"
    return text + "."


def _eps(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3f}"


def format_table(
    rows: Sequence[dict[str, Any]],
    *,
    delta: float,
    significance: float,
    privacy: dict[str, Any] | None = None,
) -> str:
    """A Markdown table of :func:`run_audit` rows; with ``privacy`` (:func:`composition`) a
    footer gives the epsilon of releasing every run together."""
    attack = any("attack_auc" in r for r in rows)
    head = [
        "noise multiplier",
        f"accounted epsilon (delta={delta:g})",
        f"audited lower bound ({1 - significance:.0%} conf.)",
        "correct / guesses",
    ]
    head += (
        ["attack AUC (run)", "attack TPR @ 1% FPR (run)", "test accuracy (run)"] if attack else []
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"{r['noise_multiplier']:g}",
            _eps(r["accounted_epsilon"]),
            f"{r['epsilon_lower_bound']:.3f}",
            f"{r['num_correct']} / {r['num_guesses']}",
        ]
        if attack:
            cells += [
                f"{r['attack_auc']:.3f}",
                f"{r['attack_tpr_at_1pct_fpr']:.3f}",
                f"{r['test_accuracy']:.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if privacy is not None:
        lines += ["", composition_footer(privacy)]
    return "\n".join(lines)
