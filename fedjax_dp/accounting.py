"""Host-side privacy accounting for DP federated learning, built on ``dp_accounting``.

This module runs on the host only (pure Python + ``dp_accounting``); it is never traced by JAX.
The engine describes each round by a :class:`RoundPrivacy`, built from the same objects that
build the round, and an :class:`Accountant` composes rounds and reports epsilon at a fixed delta.

Analysis
========

A round samples a cohort from a population of ``num_clients`` clients, either by **Poisson
sampling** (each client independently with probability ``q``) or by **fixed-size sampling**
(exactly ``cohort_size`` clients uniformly without replacement). Rounds compose adaptively and may
differ (heterogeneous composition).

**User level** (``unit="user"``, DP-FedAvg). Each sampled client's model delta is clipped to L2
norm ``C``; the clipped deltas are summed and ``N(0, (sigma C)^2 I)`` is added to the sum once per
round. The guarantee covers the noisy *sum*; anything computed from it is post-processing, so the
engine must normalise it by a public, data-independent denominator (e.g. the expected cohort size
``q * num_clients``), never by the realised Poisson cohort size.
The Poisson analysis also assumes the sampled cohort is never truncated: a sampler that caps it
at a static size and drops the overflow is outside it (``dp_accounting`` models that case with
``TruncatedSubsampledGaussianDpEvent``, PLD only), so report any overflow.

* Poisson sampling: neighbouring datasets differ by adding/removing one client's whole data
  (``ADD_OR_REMOVE_ONE``). The sum has add/remove sensitivity ``C``, so a round is the Poisson
  sampled Gaussian mechanism ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``.
* Fixed-size sampling: ``dp_accounting`` analyses sampling without replacement only under the
  **replace-one** relation (``REPLACE_ONE``: one client's data is replaced by arbitrary other data;
  the population size is public), and only with the RDP accountant (Wang, Balle, Kasiviswanathan,
  "Subsampled Renyi DP", AISTATS 2019, Thm. 27, as implemented in ``dp_accounting``). Its
  ``GaussianDpEvent.noise_multiplier`` is the noise standard deviation divided by the
  replace-one sensitivity (its base RDP is ``alpha / (2 s^2)`` for ``noise_multiplier = s``). A
  clipped sum has replace-one sensitivity ``2C``, so the round is
  ``SampledWithoutReplacementDpEvent(num_clients, cohort_size, GaussianDpEvent(sigma / 2))``
  and the resulting epsilon is a replace-one guarantee (not comparable one-to-one with the
  add/remove epsilon of Poisson sampling). The PLD accountant does not support this event, so
  ``accountant="pld"`` with fixed-size user-level rounds raises a ``ValueError``.

**Example level** (``unit="example"``, DP-SGD inside every client). In each local step the
per-example gradients are clipped to ``C_ex``, summed, and ``N(0, (sigma_ex C_ex)^2 I)`` is added;
every example is used in exactly ``E`` local steps per round (``compositions=E``). Neighbouring
datasets differ by the *zero-out* relation (``REPLACE_SPECIAL``): one example is replaced by a null
example with zero gradient, so client dataset sizes (hence batch schedules) are public. Within a
round in which its client participates, an example passes through ``E`` adaptive Gaussian
mechanisms with sensitivity ``C_ex`` and noise multiplier ``sigma_ex``, which is exactly one
Gaussian mechanism with noise multiplier ``s = sigma_ex / sqrt(E)``.

Client sampling does **not** amplify example-level privacy the way Poisson sampling of examples
does. When the client is not sampled, the round's output is not the output "with the example
removed": in the neighbouring dataset the client still participates whenever it is sampled, with
all its other examples. Writing ``X`` for the output distribution without the client, ``Y`` / ``Y'``
for the output with the client and the example present / zeroed out, and ``p`` for the
client's participation probability (``q`` for Poisson, ``cohort_size / num_clients`` for fixed
size), one round is the pair ``P = (1-p) X + p Y``, ``Q = (1-p) X + p Y'``. Its privacy loss is, by
joint convexity, at most that of the pair in which participation is revealed,
``(1-p) bot + p N(1, s^2)`` versus ``(1-p) bot + p N(0, s^2)``, and this bound is attained when the
client's other examples make its participation evident (many examples with aligned clipped
gradients), so it is tight in the worst case. Treating the round as
``PoissonSampledDpEvent(p, GaussianDpEvent(s))`` (add/remove of a Poisson-sampled record) would
under-report epsilon, by a large factor for small ``p``. Hence, per round:

* PLD: the privacy loss distribution of the revealed pair is the mixture, with weight ``p``, of
  the Gaussian PLD (``dp_accounting``'s ``from_gaussian_mechanism(s)``) and the identity PLD
  (``PrivacyLossDistribution.compute_mixture``);
* RDP: ``rdp(alpha) = log(1 - p + p exp((alpha - 1) g(alpha))) / (alpha - 1)`` where
  ``g(alpha) = alpha / (2 s^2)`` is the Gaussian RDP computed by ``dp_accounting``'s
  ``RdpAccountant`` (joint convexity of ``exp((alpha - 1) D_alpha)``).

``dp_accounting`` has no ``DpEvent`` for the revealed pair; :meth:`RoundPrivacy.dp_event`
returns the event conditioned on participation (E Gaussians), an upper bound for the round that
ignores client sampling. With ``p = 1`` the two coincide.

Accountants and conversions
===========================

* ``accountant="rdp"``: RDP over :data:`RDP_ORDERS` (``dp_accounting``'s default orders plus
  extra large orders for small-loss regimes). ``conversion="improved"`` (default) is
  ``dp_accounting.rdp.compute_epsilon`` (Canonne, Kamath, Steinke 2020, Prop. 12; the same formula
  as Balle et al. 2020, Thm. 21, used by Opacus);
  ``conversion="classic"`` is Mironov's ``eps = min_alpha rdp(alpha) + log(1/delta)/(alpha-1)``
  (:func:`classic_rdp_epsilon`), which reproduces older published numbers (TF-Privacy,
  Abadi et al.).
* ``accountant="pld"``: privacy loss distributions (connect-the-dots, pessimistic) with
  ``value_discretization_interval =`` :data:`PLD_VALUE_DISCRETIZATION_INTERVAL` (``1e-4``,
  ``dp_accounting``'s default); tighter than RDP.

A round with ``noise_multiplier=0`` is not private: epsilon is ``inf`` from then on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution as _pld_lib
from dp_accounting.rdp import rdp_privacy_accountant as _rdp_lib


class _DropOrderExclusionNotices(logging.Filter):
    """dp_accounting logs a warning each time a fractional RDP order fails to converge and is
    excluded from the minimum over orders. That is benign (the bound stays valid, the
    remaining orders still give it) and would flood every run's output, so it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in str(record.msg)


logging.getLogger("absl").addFilter(_DropOrderExclusionNotices())

__all__ = [
    "PLD_VALUE_DISCRETIZATION_INTERVAL",
    "RDP_ORDERS",
    "Accountant",
    "RoundPrivacy",
    "classic_rdp_epsilon",
    "epsilon",
]

#: RDP orders: ``dp_accounting``'s defaults (1.1..10.9 step 0.1, 11..63, 128, 256, 512, 1024) plus
#: extra large orders, which matter when the per-round privacy loss is small (large sigma).
RDP_ORDERS: tuple[float, ...] = tuple(
    sorted(
        {float(a) for a in _rdp_lib.DEFAULT_RDP_ORDERS}
        | {72.0, 80.0, 96.0, 112.0, 144.0, 160.0, 192.0, 224.0, 320.0, 384.0, 448.0, 640.0}
        | {768.0, 896.0, 1536.0, 2048.0}
    )
)

#: Discretisation of the privacy loss for ``accountant="pld"`` (``dp_accounting``'s default).
PLD_VALUE_DISCRETIZATION_INTERVAL: float = 1e-4

_SAMPLINGS = ("poisson", "fixed")
_UNITS = ("user", "example")
_ACCOUNTANTS = ("rdp", "pld")
_CONVERSIONS = ("improved", "classic")
_STATE_VERSION = 1
_NeighborRel = dp_accounting.NeighboringRelation


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_delta(delta: Any) -> float:
    if not _is_real(delta) or not 0.0 < float(delta) < 1.0:
        raise ValueError(
            f"delta={delta!r} must be in (0, 1); typically delta < 1 / (number of protected units)"
        )
    return float(delta)


def _check_accountant_and_conversion(accountant: Any, conversion: Any) -> None:
    if accountant not in _ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r} must be one of {_ACCOUNTANTS}")
    if conversion not in _CONVERSIONS:
        raise ValueError(f"conversion={conversion!r} must be one of {_CONVERSIONS}")
    if conversion == "classic" and accountant != "rdp":
        raise ValueError(
            f"conversion='classic' is an RDP -> (eps, delta) conversion and needs accountant='rdp' "
            f"(got accountant={accountant!r}); use conversion='improved' with accountant='pld'"
        )


@dataclasses.dataclass(frozen=True)
class RoundPrivacy:
    """The privacy-relevant, public description of one round.

    Built by the engine from the same objects that build the round. See the module docstring for
    the analysis each combination of ``unit`` and ``sampling`` receives.

    Attributes:
      noise_multiplier: sigma, the standard deviation of the Gaussian noise on the summed, clipped
        contributions divided by the clipping norm (per round for ``unit="user"``; per local step
        for ``unit="example"``). ``0`` is allowed and means the round is not private
        (epsilon = inf).
      sampling: ``"poisson"`` or ``"fixed"``.
      num_clients: the population size.
      sampling_rate: ``q`` in ``(0, 1]``; required for ``"poisson"``. For ``"fixed"`` it may be
        left ``None`` or must equal ``cohort_size / num_clients``.
      cohort_size: required for ``"fixed"``, in ``[1, num_clients]``; must be ``None`` for
        ``"poisson"`` (a padded/maximum cohort size is not a privacy parameter).
      compositions: ``E``, how many Gaussian mechanisms each protected unit passes through per
        round (``1`` for user level, the number of local epochs for example level).
      unit: ``"user"`` or ``"example"``, the unit of protection.
    """

    noise_multiplier: float
    sampling: str
    num_clients: int
    sampling_rate: float | None = None
    cohort_size: int | None = None
    compositions: int = 1
    unit: str = "user"

    def __post_init__(self) -> None:
        sigma = self.noise_multiplier
        if not _is_real(sigma) or math.isnan(float(sigma)) or float(sigma) < 0:
            raise ValueError(
                f"noise_multiplier={sigma!r} must be a number >= 0 (0 means no privacy)"
            )
        if math.isinf(float(sigma)):
            raise ValueError(f"noise_multiplier={sigma!r} must be finite")
        object.__setattr__(self, "noise_multiplier", float(sigma))
        if self.sampling not in _SAMPLINGS:
            raise ValueError(f"sampling={self.sampling!r} must be one of {_SAMPLINGS}")
        if self.unit not in _UNITS:
            raise ValueError(f"unit={self.unit!r} must be one of {_UNITS}")
        if not _is_int(self.num_clients) or self.num_clients < 1:
            raise ValueError(f"num_clients={self.num_clients!r} must be an integer >= 1")
        object.__setattr__(self, "num_clients", int(self.num_clients))
        if not _is_int(self.compositions) or self.compositions < 1:
            raise ValueError(
                f"compositions={self.compositions!r} must be an integer >= 1 (1 for user level, "
                "the number of local epochs for example level)"
            )
        object.__setattr__(self, "compositions", int(self.compositions))
        q = self.sampling_rate
        if q is not None:
            if not _is_real(q) or not 0.0 < float(q) <= 1.0:
                raise ValueError(f"sampling_rate={q!r} must be in (0, 1]")
            object.__setattr__(self, "sampling_rate", float(q))
        m = self.cohort_size
        if self.sampling == "poisson":
            if q is None:
                raise ValueError("sampling_rate=None: sampling='poisson' needs a sampling_rate")
            if m is not None:
                raise ValueError(
                    f"cohort_size={m!r} is only used with sampling='fixed'; pass cohort_size=None "
                    "with sampling='poisson'"
                )
        else:
            if m is None:
                raise ValueError("cohort_size=None: sampling='fixed' needs a cohort_size")
            if not _is_int(m) or not 1 <= m <= self.num_clients:
                raise ValueError(
                    f"cohort_size={m!r} must be an integer in [1, num_clients={self.num_clients}]"
                )
            object.__setattr__(self, "cohort_size", int(m))
            if q is not None and not math.isclose(
                float(q), int(m) / self.num_clients, rel_tol=1e-9
            ):
                raise ValueError(
                    f"sampling_rate={q!r} must equal cohort_size / num_clients = "
                    f"{int(m) / self.num_clients!r} for sampling='fixed' (or be None)"
                )

    @property
    def participation_probability(self) -> float:
        """The probability that a given client is in the cohort of this round."""
        if self.sampling == "poisson":
            return float(self.sampling_rate)
        return self.cohort_size / self.num_clients

    @property
    def effective_noise_multiplier(self) -> float:
        """``sigma / sqrt(compositions)``: the single Gaussian equivalent to the E Gaussians."""
        return self.noise_multiplier / math.sqrt(self.compositions)

    @property
    def neighboring_relation(self) -> str:
        """The neighbouring relation the epsilon of this kind of round refers to."""
        if self.unit == "example":
            return "zero_out_example"
        if self.sampling == "poisson":
            return "add_or_remove_one_user"
        return "replace_one_user"

    def dp_event(self) -> dp_accounting.DpEvent:
        """Returns one round's ``dp_accounting`` event.

        * ``noise_multiplier == 0``: ``NonPrivateDpEvent``.
        * user level, Poisson: ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma / sqrt(E)))``
          (add/remove one user).
        * user level, fixed size: ``SampledWithoutReplacementDpEvent(num_clients, cohort_size,
          GaussianDpEvent(sigma / (2 sqrt(E))))``, to be accounted under ``REPLACE_ONE`` (the
          ``/ 2`` is the replace-one sensitivity ``2C`` of a clipped sum).
        * example level: the event given that the client participates, ``GaussianDpEvent(sigma)``
          self-composed ``E`` times (zero-out one example). It ignores client sampling and so
          upper-bounds the round; :class:`Accountant` uses the tighter participation-revealed
          bound described in the module docstring, for which ``dp_accounting`` has no event.
        """
        if self.noise_multiplier == 0:
            return dp_accounting.NonPrivateDpEvent()
        if self.unit == "example":
            gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
            if self.compositions == 1:
                return gaussian
            return dp_accounting.SelfComposedDpEvent(gaussian, self.compositions)
        sigma = self.effective_noise_multiplier
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(
                float(self.sampling_rate), dp_accounting.GaussianDpEvent(sigma)
            )
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.num_clients, self.cohort_size, dp_accounting.GaussianDpEvent(sigma / 2.0)
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundPrivacy:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"round_privacy has unknown fields {sorted(unknown)}; known: {names}")
        return cls(**d)


def classic_rdp_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> float:
    """Classic RDP -> (epsilon, delta) conversion (Mironov 2017, Prop. 3).

    ``eps = min over orders alpha > 1 of rdp(alpha) + log(1 / delta) / (alpha - 1)``. Looser than
    ``dp_accounting``'s default conversion; exposed to reproduce older published numbers.

    Args:
      orders: RDP orders.
      rdp: RDP values at ``orders`` (may contain ``inf``).
      delta: target delta in ``(0, 1)``.

    Returns:
      The smallest epsilon over the orders (``inf`` if no order gives a finite value).
    """
    delta = _check_delta(delta)
    orders_arr = np.asarray(orders, dtype=np.float64)
    rdp_arr = np.asarray(rdp, dtype=np.float64)
    if orders_arr.shape != rdp_arr.shape or orders_arr.ndim != 1:
        raise ValueError(
            f"orders (shape {orders_arr.shape}) and rdp (shape {rdp_arr.shape}) must be 1-D "
            "sequences of the same length"
        )
    keep = orders_arr > 1.0
    if not keep.any():
        raise ValueError("orders must contain at least one order > 1")
    eps = rdp_arr[keep] + math.log(1.0 / delta) / (orders_arr[keep] - 1.0)
    eps = eps[~np.isnan(eps)]
    return float(np.min(eps)) if eps.size else math.inf


def _example_rdp(rp: RoundPrivacy, orders: np.ndarray) -> np.ndarray:
    """Per-round RDP of the participation-revealed Gaussian (see the module docstring)."""
    gaussian = _rdp_lib.RdpAccountant(list(orders), _NeighborRel.REPLACE_SPECIAL)
    gaussian.compose(dp_accounting.GaussianDpEvent(rp.effective_noise_multiplier))
    g = gaussian.rdp
    p = rp.participation_probability
    if p == 1.0:
        return g
    log_mix = np.logaddexp(math.log1p(-p), math.log(p) + (orders - 1.0) * g)
    return log_mix / (orders - 1.0)


def _round_pld(rp: RoundPrivacy) -> _pld_lib.PrivacyLossDistribution:
    """One round's privacy loss distribution (``noise_multiplier > 0``)."""
    vdi = PLD_VALUE_DISCRETIZATION_INTERVAL
    if rp.unit == "user":
        # Mirrors dp_accounting.pld.PLDAccountant on PoissonSampledDpEvent(q, GaussianDpEvent).
        return _pld_lib.from_gaussian_mechanism(
            standard_deviation=rp.effective_noise_multiplier,
            value_discretization_interval=vdi,
            sampling_prob=float(rp.sampling_rate),
            neighboring_relation=_NeighborRel.ADD_OR_REMOVE_ONE,
        )
    gaussian = _pld_lib.from_gaussian_mechanism(
        standard_deviation=rp.effective_noise_multiplier,
        value_discretization_interval=vdi,
        neighboring_relation=_NeighborRel.REPLACE_SPECIAL,
    )
    p = rp.participation_probability
    if p == 1.0:
        return gaussian
    return gaussian.compute_mixture(_pld_lib.identity(vdi), p)


class Accountant:
    """Host-side incremental accountant over rounds.

    Rounds are stored as a list of ``(RoundPrivacy, count)``; consecutive composes of an identical
    ``RoundPrivacy`` are merged, so PLD self-composes them at once instead of round by round.
    :meth:`epsilon` is computed lazily and cached until the next :meth:`compose`; per-round RDP
    vectors and the PLD of all but the last schedule entry are cached, so calling it every round
    stays cheap.

    All rounds composed into one accountant must have the same ``unit`` and, for user level, the
    same kind of sampling (Poisson gives an add/remove-one guarantee, fixed size a replace-one
    guarantee; they do not compose into one number). To report both user- and example-level
    guarantees, use two accountants.
    """

    def __init__(
        self, *, delta: float, accountant: str = "rdp", conversion: str = "improved"
    ) -> None:
        """Initialises the accountant.

        Args:
          delta: target delta in ``(0, 1)``.
          accountant: ``"rdp"`` or ``"pld"``.
          conversion: ``"improved"`` (``dp_accounting``'s default RDP conversion) or
            ``"classic"`` (only with ``accountant="rdp"``).
        """
        self._delta = _check_delta(delta)
        _check_accountant_and_conversion(accountant, conversion)
        self._accountant = accountant
        self._conversion = conversion
        self._schedule: list[list[Any]] = []  # [[RoundPrivacy, count], ...]
        self._cached_epsilon: float | None = None
        self._rdp_cache: dict[RoundPrivacy, np.ndarray] = {}
        self._pld_base_cache: dict[RoundPrivacy, _pld_lib.PrivacyLossDistribution] = {}
        self._pld_prefix: _pld_lib.PrivacyLossDistribution | None = None
        self._pld_prefix_len = 0

    @property
    def delta(self) -> float:
        """The target delta."""
        return self._delta

    @property
    def accountant(self) -> str:
        """``"rdp"`` or ``"pld"``."""
        return self._accountant

    @property
    def conversion(self) -> str:
        """``"improved"`` or ``"classic"``."""
        return self._conversion

    @property
    def rounds(self) -> int:
        """The number of rounds composed so far."""
        return sum(count for _, count in self._schedule)

    @property
    def schedule(self) -> tuple[tuple[RoundPrivacy, int], ...]:
        """The composed rounds as ``(RoundPrivacy, count)`` pairs (merged runs)."""
        return tuple((rp, count) for rp, count in self._schedule)

    @property
    def neighboring_relation(self) -> str | None:
        """The neighbouring relation epsilon refers to (``None`` before any round)."""
        return self._schedule[0][0].neighboring_relation if self._schedule else None

    def compose(self, round_privacy: RoundPrivacy, count: int = 1) -> None:
        """Accounts for ``count`` more rounds described by ``round_privacy``.

        Args:
          round_privacy: the round's description.
          count: how many such rounds (``0`` is a no-op).
        """
        if not isinstance(round_privacy, RoundPrivacy):  # project convention: ValueError
            raise ValueError(  # noqa: TRY004
                f"round_privacy={round_privacy!r} must be a RoundPrivacy instance"
            )
        if not _is_int(count) or count < 0:
            raise ValueError(f"count={count!r} must be an integer >= 0")
        if count == 0:
            return
        if self._schedule:
            first = self._schedule[0][0]
            if round_privacy.unit != first.unit:
                raise ValueError(
                    f"round_privacy.unit={round_privacy.unit!r} differs from the unit "
                    f"{first.unit!r} already composed; use one Accountant per unit of protection"
                )
            if round_privacy.neighboring_relation != first.neighboring_relation:
                raise ValueError(
                    f"round_privacy.sampling={round_privacy.sampling!r} gives a "
                    f"{round_privacy.neighboring_relation} guarantee but this accountant already "
                    f"holds {first.neighboring_relation} rounds; use one sampling scheme per "
                    "user-level accountant"
                )
        if (
            self._accountant == "pld"
            and round_privacy.unit == "user"
            and round_privacy.sampling == "fixed"
            and round_privacy.noise_multiplier > 0
        ):
            raise ValueError(
                "accountant='pld' does not support fixed-size (sampling without replacement) "
                "user-level rounds: dp_accounting's PLD accountant has no "
                "SampledWithoutReplacementDpEvent; use accountant='rdp' (replace-one relation) or "
                "sampling='poisson'"
            )
        self._cached_epsilon = None
        if self._schedule and self._schedule[-1][0] == round_privacy:
            self._schedule[-1][1] += int(count)
        else:
            self._schedule.append([round_privacy, int(count)])

    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` after everything composed so far.

        Returns ``0.0`` before any round and ``inf`` if a round with ``noise_multiplier=0`` was
        composed.
        """
        if self._cached_epsilon is None:
            self._cached_epsilon = self._compute_epsilon()
        return self._cached_epsilon

    def _compute_epsilon(self) -> float:
        if not self._schedule:
            return 0.0
        if any(rp.noise_multiplier == 0 for rp, _ in self._schedule):
            return math.inf
        if self._accountant == "rdp":
            return self._rdp_epsilon()
        return self._pld_epsilon()

    def _round_rdp(self, rp: RoundPrivacy) -> np.ndarray:
        if rp not in self._rdp_cache:
            orders = np.asarray(RDP_ORDERS, dtype=np.float64)
            if rp.unit == "example":
                self._rdp_cache[rp] = _example_rdp(rp, orders)
            else:
                relation = (
                    _NeighborRel.ADD_OR_REMOVE_ONE
                    if rp.sampling == "poisson"
                    else _NeighborRel.REPLACE_ONE
                )
                acc = _rdp_lib.RdpAccountant(list(RDP_ORDERS), relation)
                acc.compose(rp.dp_event())
                self._rdp_cache[rp] = acc.rdp
        return self._rdp_cache[rp]

    def _rdp_epsilon(self) -> float:
        total = np.zeros(len(RDP_ORDERS), dtype=np.float64)
        for rp, count in self._schedule:
            total += count * self._round_rdp(rp)
        if self._conversion == "classic":
            return classic_rdp_epsilon(RDP_ORDERS, total, self._delta)
        eps, _ = _rdp_lib.compute_epsilon(RDP_ORDERS, total, self._delta)
        return float(eps)

    def _entry_pld(self, rp: RoundPrivacy, count: int) -> _pld_lib.PrivacyLossDistribution:
        if rp not in self._pld_base_cache:
            self._pld_base_cache[rp] = _round_pld(rp)
        base = self._pld_base_cache[rp]
        return base if count == 1 else base.self_compose(count)

    def _pld_epsilon(self) -> float:
        # Entries before the last are final (a later compose can only extend the last one), so
        # their composition is cached.
        while self._pld_prefix_len < len(self._schedule) - 1:
            rp, count = self._schedule[self._pld_prefix_len]
            entry = self._entry_pld(rp, count)
            self._pld_prefix = (
                entry if self._pld_prefix is None else self._pld_prefix.compose(entry)
            )
            self._pld_prefix_len += 1
        rp, count = self._schedule[-1]
        last = self._entry_pld(rp, count)
        total = last if self._pld_prefix is None else self._pld_prefix.compose(last)
        return float(total.get_epsilon_for_delta(self._delta))

    def state_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable description from which :meth:`from_state_dict` rebuilds."""
        return {
            "version": _STATE_VERSION,
            "delta": self._delta,
            "accountant": self._accountant,
            "conversion": self._conversion,
            "schedule": [
                {"round_privacy": rp.to_dict(), "count": count} for rp, count in self._schedule
            ],
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> Accountant:
        """Rebuilds an accountant from :meth:`state_dict` by re-composing its schedule."""
        if not isinstance(d, dict) or d.get("version") != _STATE_VERSION:
            raise ValueError(
                f"d must be a dict produced by Accountant.state_dict (version {_STATE_VERSION})"
            )
        acc = cls(delta=d["delta"], accountant=d["accountant"], conversion=d["conversion"])
        for entry in d["schedule"]:
            acc.compose(RoundPrivacy.from_dict(entry["round_privacy"]), entry["count"])
        return acc


def epsilon(
    round_privacy: RoundPrivacy | Sequence[tuple[RoundPrivacy, int]],
    *,
    rounds: int | None = None,
    delta: float,
    accountant: str = "rdp",
    conversion: str = "improved",
) -> float:
    """One-shot epsilon.

    Args:
      round_privacy: a :class:`RoundPrivacy` (then ``rounds`` is required: homogeneous rounds) or
        a heterogeneous schedule of ``(RoundPrivacy, count)`` pairs (then ``rounds`` must be
        ``None``).
      rounds: number of rounds for a single ``RoundPrivacy``.
      delta: target delta in ``(0, 1)``.
      accountant: ``"rdp"`` or ``"pld"``.
      conversion: ``"improved"`` or ``"classic"`` (RDP only).

    Returns:
      Epsilon at ``delta``.
    """
    acc = Accountant(delta=delta, accountant=accountant, conversion=conversion)
    if isinstance(round_privacy, RoundPrivacy):
        if rounds is None:
            raise ValueError("rounds=None: pass rounds=<number of rounds> with a RoundPrivacy")
        acc.compose(round_privacy, rounds)
    else:
        if rounds is not None:
            raise ValueError(
                f"rounds={rounds!r} must be None when round_privacy is a schedule of "
                "(RoundPrivacy, count) pairs"
            )
        for item in round_privacy:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(
                    f"round_privacy schedule item {item!r} must be a (RoundPrivacy, count) pair"
                )
            acc.compose(item[0], item[1])
    return acc.epsilon()
