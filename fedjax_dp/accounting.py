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
every example is used in exactly ``E`` local steps per round (``compositions=E``), at most once in
each (guaranteed by the client's batch schedule; see ``docs/privacy.md``). Neighbouring
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

Other user-level mechanisms (``RoundPrivacy.mechanism``)
=========================================================

* ``"gaussian"`` (default): the user-level analysis above. Adaptive clipping (Andrew et al.
  2021) is this case too: its round releases the clipped sum and the centred clipped count as
  one Gaussian mechanism with the round's total noise multiplier ``z``
  (:func:`fedjax_dp.adaptive_clipping`); per-layer clipping is the Gaussian mechanism over the
  combined sensitivity ``sqrt(sum_g C_g^2)`` (:func:`fedjax_dp.clip_per_layer`).
* ``"laplace"``: each delta is clipped to L1 norm ``C`` and Laplace noise of scale
  ``b = sigma C`` is added to the sum, a pure ``eps_0 = 1 / sigma`` mechanism under add/remove
  of one user (``LaplaceDpEvent(sigma)``). Poisson: ``PoissonSampledDpEvent(q,
  LaplaceDpEvent(sigma))`` with PLD; the RDP accountant (``dp_accounting`` has no RDP bound for
  sampled Laplace) accounts the UNSAMPLED ``LaplaceDpEvent(sigma)``, a valid upper bound.
  Fixed size: replace-one, L1 sensitivity ``2C``, so ``LaplaceDpEvent(sigma / 2)`` without
  sampling amplification (RDP only, like the Gaussian fixed-size case). Rounds that are all
  Laplace also satisfy pure DP by basic composition, ``sum_t eps_t`` with ``eps_t = 1 / sigma``
  (``log(1 + q (e^{1/sigma} - 1))`` with Poisson rate ``q``, the amplification of pure DP by
  Poisson sampling under add/remove; ``2 / sigma`` for fixed size); the accountant reports the
  smaller of that and its RDP/PLD epsilon (both are upper bounds).
* ``"local_gaussian"`` (local DP): every client adds ``N(0, (sigma C)^2 I)`` to its own update
  clipped to L2 norm ``C``. The guarantee is per client, for its released updates, with respect
  to replacing that client's data by any other data (``neighboring_relation =
  "local_replace_one_user"``): L2 sensitivity ``2C``, so each release is
  ``GaussianDpEvent(sigma / 2)``. EVERY round is counted (the client may take part in all of
  them; no amplification by sampling, which an observer of the client's upload does not
  enjoy, and none by aggregation, which the local model does not trust). Not comparable with
  central epsilons.

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

Calibration, noise schedules and the noise-cohort trick
=======================================================

* :func:`calibrate` inverts the accountant: the smallest noise multiplier (within a relative
  ``tolerance``) whose epsilon at ``delta`` after ``rounds`` rounds is at most the target, never
  above it. It runs ``dp_accounting``'s ``calibrate_dp_mechanism`` on :class:`Accountant`, so
  it covers every case above, including the example-level bound that has no ``DpEvent``.
* :func:`noise_schedule` gives per-round noise multipliers (constant, linear or geometric, in
  ``stages`` blocks); :func:`privacy_schedule` turns them into ``(RoundPrivacy, count)`` pairs,
  accounted as a heterogeneous composition (RDP vectors add up; PLDs are convolved). A
  schedule's epsilon lies between those of the constant schedules at its smallest and largest
  noise multiplier. :func:`calibrate` with ``noise_profile`` scales a whole schedule.
* :func:`noise_cohort` (user level, Gaussian): the simulation adds the noise that makes the noise
  on the mean update equal to that of a larger deployment, and the deployment's rounds are what
  is accounted. That epsilon is NOT a guarantee of the simulated run; see the function.
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
from dp_accounting import mechanism_calibration as _calibration
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
    "MIN_CALIBRATED_NOISE_MULTIPLIER",
    "PLD_VALUE_DISCRETIZATION_INTERVAL",
    "RDP_ORDERS",
    "SCHEDULE_KINDS",
    "Accountant",
    "RoundPrivacy",
    "calibrate",
    "classic_rdp_epsilon",
    "epsilon",
    "noise_cohort",
    "noise_schedule",
    "privacy_schedule",
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
_MECHANISMS = ("gaussian", "laplace", "local_gaussian")
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
      mechanism: ``"gaussian"`` (default), ``"laplace"`` (``noise_multiplier`` is the Laplace
        scale divided by the L1 clip norm) or ``"local_gaussian"`` (every client noises its own
        update; a per-client local-DP guarantee). The last two need ``unit="user"`` and
        ``compositions=1``; see the module docstring.
    """

    noise_multiplier: float
    sampling: str
    num_clients: int
    sampling_rate: float | None = None
    cohort_size: int | None = None
    compositions: int = 1
    unit: str = "user"
    mechanism: str = "gaussian"

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
        if self.mechanism not in _MECHANISMS:
            raise ValueError(f"mechanism={self.mechanism!r} must be one of {_MECHANISMS}")
        if self.mechanism != "gaussian" and (self.unit != "user" or self.compositions != 1):
            raise ValueError(
                f"mechanism={self.mechanism!r} is a user-level mechanism applied once per round: "
                f"it needs unit='user' and compositions=1 (got unit={self.unit!r}, "
                f"compositions={self.compositions!r})"
            )
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
        if self.mechanism == "local_gaussian":
            return "local_replace_one_user"
        if self.sampling == "poisson":
            return "add_or_remove_one_user"
        return "replace_one_user"

    @property
    def pure_epsilon(self) -> float | None:
        """For ``mechanism="laplace"``: the round's pure-DP epsilon (``delta = 0``), else None.

        ``1 / sigma`` amplified by Poisson sampling to ``log(1 + q (exp(1 / sigma) - 1))``
        (add/remove); ``2 / sigma`` for fixed size (replace-one, L1 sensitivity ``2C``, no
        amplification claimed); ``inf`` for ``sigma = 0``.
        """
        if self.mechanism != "laplace":
            return None
        if self.noise_multiplier == 0:
            return math.inf
        if self.sampling == "poisson":
            return math.log1p(float(self.sampling_rate) * math.expm1(1.0 / self.noise_multiplier))
        return 2.0 / self.noise_multiplier

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
        * ``mechanism="laplace"``: Poisson ``PoissonSampledDpEvent(q, LaplaceDpEvent(sigma))``
          (add/remove); fixed size ``LaplaceDpEvent(sigma / 2)`` (replace-one, no sampling).
        * ``mechanism="local_gaussian"``: ``GaussianDpEvent(sigma / 2)`` for every round, whatever
          the sampling (one client's release, replace its data: sensitivity ``2C``).
        """
        if self.noise_multiplier == 0:
            return dp_accounting.NonPrivateDpEvent()
        if self.mechanism == "local_gaussian":
            return dp_accounting.GaussianDpEvent(self.noise_multiplier / 2.0)
        if self.mechanism == "laplace":
            if self.sampling == "poisson":
                return dp_accounting.PoissonSampledDpEvent(
                    float(self.sampling_rate), dp_accounting.LaplaceDpEvent(self.noise_multiplier)
                )
            return dp_accounting.LaplaceDpEvent(self.noise_multiplier / 2.0)
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
    if rp.mechanism == "local_gaussian":
        return _pld_lib.from_gaussian_mechanism(
            standard_deviation=rp.noise_multiplier / 2.0, value_discretization_interval=vdi
        )
    if rp.mechanism == "laplace":  # Poisson only (fixed-size user-level rounds are refused)
        return _pld_lib.from_laplace_mechanism(
            parameter=rp.noise_multiplier,
            value_discretization_interval=vdi,
            sampling_prob=float(rp.sampling_rate),
        )
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
            and round_privacy.mechanism != "local_gaussian"
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
        eps = self._rdp_epsilon() if self._accountant == "rdp" else self._pld_epsilon()
        if all(rp.mechanism == "laplace" for rp, _ in self._schedule):
            # Pure DP composes additively (delta = 0); both bounds hold, report the smaller.
            eps = min(eps, math.fsum(count * rp.pure_epsilon for rp, count in self._schedule))
        return eps

    def _round_rdp(self, rp: RoundPrivacy) -> np.ndarray:
        if rp not in self._rdp_cache:
            orders = np.asarray(RDP_ORDERS, dtype=np.float64)
            if rp.unit == "example":
                self._rdp_cache[rp] = _example_rdp(rp, orders)
            elif rp.mechanism == "laplace" and rp.sampling == "poisson":
                # dp_accounting has no RDP bound for sampled Laplace: the unsampled mechanism
                # upper-bounds it (sampling never hurts under add/remove).
                acc = _rdp_lib.RdpAccountant(list(RDP_ORDERS), _NeighborRel.ADD_OR_REMOVE_ONE)
                acc.compose(dp_accounting.LaplaceDpEvent(rp.noise_multiplier))
                self._rdp_cache[rp] = acc.rdp
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


# ----------------------------------------------------------------------------- calibration,
# noise schedules and the noise-cohort trick

#: The kinds of :func:`noise_schedule`.
SCHEDULE_KINDS: tuple[str, ...] = ("constant", "linear", "geometric")

#: :func:`calibrate` does not search below this noise multiplier.
MIN_CALIBRATED_NOISE_MULTIPLIER: float = 1e-4

# Epsilon reported to dp_accounting's calibration helper in place of larger values (inf): its
# root finder needs finite values; any cap above the target keeps the sign of epsilon - target.
_EPSILON_CAP = 1e12


def _check_positive_finite(name: str, value: Any) -> float:
    if not _is_real(value) or not 0.0 < float(value) < math.inf:
        raise ValueError(f"{name}={value!r} must be a finite number > 0")
    return float(value)


def _check_count(name: str, value: Any, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def noise_schedule(
    kind: str,
    *,
    start: float,
    end: float | None = None,
    rounds: int,
    stages: int | None = None,
) -> tuple[float, ...]:
    """Per-round noise multipliers that move from ``start`` to ``end`` over ``rounds`` rounds.

    The rounds are split into ``S = min(stages, rounds)`` consecutive blocks of (nearly) equal
    length; round ``t`` (0-based) is in stage ``s = floor(t * S / rounds)`` and gets:

    =============  ====================================================
    kind           noise multiplier of stage ``s``
    =============  ====================================================
    ``constant``   ``start`` (``end`` must be ``None`` or ``start``)
    ``linear``     ``start + (end - start) * s / (S - 1)``
    ``geometric``  ``start * (end / start) ** (s / (S - 1))``
    =============  ====================================================

    The first stage is exactly ``start`` and the last exactly ``end``; with ``S = 1`` every round
    gets ``start``. ``end < start`` decays the noise (each later round spends more of the budget),
    ``end > start`` grows it. The rounds are accounted as a heterogeneous composition
    (:func:`privacy_schedule`). Each distinct value costs the accountant one computation (about
    0.05 s with RDP, more with PLD, for every evaluation of :func:`calibrate`), so a schedule with a
    few stages is much cheaper to account and calibrate than one that changes every round.

    Args:
      kind: one of :data:`SCHEDULE_KINDS`.
      start: the noise multiplier of the first round, finite and ``> 0``.
      end: the noise multiplier of the last round, finite and ``> 0`` (``None``: ``start``).
      rounds: the number of rounds, ``>= 1``.
      stages: the number of distinct values (``None``: ``rounds``, a new value every round).

    Returns:
      A tuple of ``rounds`` noise multipliers.

    Raises:
      ValueError: naming the invalid argument.

    Examples:
      >>> noise_schedule("linear", start=2.0, end=1.0, rounds=6, stages=3)
      (2.0, 2.0, 1.5, 1.5, 1.0, 1.0)
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {SCHEDULE_KINDS}")
    start = _check_positive_finite("start", start)
    end = start if end is None else _check_positive_finite("end", end)
    rounds = _check_count("rounds", rounds)
    stages = rounds if stages is None else _check_count("stages", stages)
    if kind == "constant" and end != start:
        raise ValueError(f"end={end!r} must be None or equal start={start!r} for kind='constant'")
    num_stages = min(stages, rounds)
    if num_stages == 1 or kind == "constant":
        values = [start]
    elif kind == "linear":
        values = [start + (end - start) * s / (num_stages - 1) for s in range(num_stages)]
    else:
        values = [start * (end / start) ** (s / (num_stages - 1)) for s in range(num_stages)]
    if len(values) > 1:
        values[-1] = end
    return tuple(values[(t * len(values)) // rounds] for t in range(rounds))


def privacy_schedule(
    round_privacy: RoundPrivacy, noise_multipliers: Sequence[float]
) -> list[tuple[RoundPrivacy, int]]:
    """``round_privacy`` with one noise multiplier per round, as ``(RoundPrivacy, count)`` pairs.

    Consecutive rounds with equal noise multipliers are merged into one pair. The result is a
    heterogeneous schedule for :func:`epsilon` (or for :meth:`Accountant.compose`, pair by pair);
    everything but the noise multiplier is taken from ``round_privacy``.

    Args:
      round_privacy: the description of every round (its ``noise_multiplier`` is replaced).
      noise_multipliers: one noise multiplier per round, e.g. from :func:`noise_schedule`.

    Returns:
      A list of ``(RoundPrivacy, count)`` pairs whose counts sum to ``len(noise_multipliers)``.

    Examples:
      >>> rp = RoundPrivacy(1.0, "poisson", 1000, sampling_rate=0.01)
      >>> [(p.noise_multiplier, n) for p, n in privacy_schedule(rp, [2.0, 2.0, 1.0])]
      [(2.0, 2), (1.0, 1)]
    """
    if not isinstance(round_privacy, RoundPrivacy):
        raise ValueError(f"round_privacy={round_privacy!r} must be a RoundPrivacy instance")  # noqa: TRY004
    out: list[tuple[RoundPrivacy, int]] = []
    previous, count = None, 0
    for sigma in noise_multipliers:
        if previous is not None and sigma == previous:
            count += 1
            continue
        if previous is not None:
            out.append((dataclasses.replace(round_privacy, noise_multiplier=previous), count))
        previous, count = sigma, 1
    if previous is not None:
        out.append((dataclasses.replace(round_privacy, noise_multiplier=previous), count))
    return out


class _ScheduleEvent(dp_accounting.DpEvent):
    """A schedule of ``(RoundPrivacy, count)`` pairs, readable only by :class:`_OurAccountant`.

    Lets :func:`dp_accounting.mechanism_calibration.calibrate_dp_mechanism` drive this module's
    :class:`Accountant`, whose example-level analysis has no ``dp_accounting`` event.
    """

    def __init__(self, schedule: tuple[tuple[RoundPrivacy, int], ...]) -> None:
        object.__setattr__(self, "schedule", tuple(schedule))  # DpEvent is a frozen attrs class


class _OurAccountant(dp_accounting.PrivacyAccountant):
    """:class:`Accountant` behind ``dp_accounting``'s ``PrivacyAccountant`` interface.

    ``epsilon_of`` maps a schedule (a tuple of ``(RoundPrivacy, count)``) to its epsilon at the
    accountant's delta; :func:`calibrate` passes a memoised :class:`Accountant` evaluation.
    """

    def __init__(self, delta: float, epsilon_of: Any) -> None:
        # The relation is nominal: the epsilon refers to the rounds' own relation
        # (RoundPrivacy.neighboring_relation).
        super().__init__(_NeighborRel.ADD_OR_REMOVE_ONE)
        self._delta = delta
        self._epsilon_of = epsilon_of
        self._schedule: list[tuple[RoundPrivacy, int]] = []

    def _maybe_compose(self, event, count, do_compose):
        if isinstance(event, dp_accounting.NoOpDpEvent):
            return None
        if not isinstance(event, _ScheduleEvent):
            return self.CompositionErrorDetails(event, "only fedjax_dp round schedules")
        if do_compose:
            self._schedule.extend((rp, n * count) for rp, n in event.schedule)
        return None

    def get_epsilon(self, target_delta: float) -> float:
        if target_delta != self._delta:
            raise ValueError(f"target_delta={target_delta!r} differs from {self._delta!r}")
        return self._epsilon_of(tuple(self._schedule))


def calibrate(
    target_epsilon: float,
    *,
    delta: float,
    rounds: int,
    sampling: str,
    num_clients: int,
    sampling_rate: float | None = None,
    cohort_size: int | None = None,
    unit: str = "user",
    compositions: int = 1,
    accountant: str = "rdp",
    conversion: str = "improved",
    noise_profile: Sequence[float] | None = None,
    tolerance: float = 1e-3,
    max_noise_multiplier: float = 1e4,
    mechanism: str = "gaussian",
) -> float:
    """The smallest noise multiplier whose epsilon at ``delta`` is at most ``target_epsilon``.

    The rounds are those of :class:`RoundPrivacy` with the given ``sampling``, ``num_clients``,
    ``sampling_rate``, ``cohort_size``, ``unit`` and ``compositions``, accounted by
    :class:`Accountant` (``accountant``, ``conversion``), so the epsilon refers to the
    neighbouring relation of those rounds (:attr:`RoundPrivacy.neighboring_relation`; see the
    module docstring). ``rounds`` homogeneous rounds, or, with ``noise_profile``, a heterogeneous
    schedule in which round ``t`` has noise multiplier ``sigma * noise_profile[t]``; the
    calibrated value is then the scale ``sigma`` (the first round's noise multiplier when
    ``noise_profile[0] == 1``, as for :func:`noise_schedule` with ``start=1``).

    The search runs ``dp_accounting``'s
    :func:`~dp_accounting.mechanism_calibration.calibrate_dp_mechanism` (Brent's method, then
    a check that the result is within budget) on ``log(sigma)`` with this module's accountant.
    Epsilon decreases as sigma grows, so the result ``sigma`` satisfies

    * ``epsilon(sigma) <= target_epsilon`` (never above the target), and
    * ``sigma <= (1 + tolerance) * sigma_min``, where ``sigma_min`` is the smallest noise
      multiplier meeting the target as computed by the accountant (up to floating-point
      rounding of ``exp``).

    Args:
      target_epsilon: the epsilon to meet, finite and ``> 0``.
      delta: the delta in ``(0, 1)``.
      rounds: the number of rounds, ``>= 1``.
      sampling: ``"poisson"`` or ``"fixed"``.
      num_clients: the population size.
      sampling_rate: ``q`` for ``sampling="poisson"``.
      cohort_size: the cohort size for ``sampling="fixed"``.
      unit: ``"user"`` or ``"example"``.
      compositions: Gaussian mechanisms per protected unit and round (local epochs for
        ``unit="example"``).
      accountant: ``"rdp"`` or ``"pld"``.
      conversion: ``"improved"`` or ``"classic"`` (RDP only).
      noise_profile: optional per-round factors (``rounds`` finite values ``> 0``).
      tolerance: relative tolerance of the result, in ``(0, 1)``.
      max_noise_multiplier: the largest noise multiplier searched (of the scale ``sigma``).
      mechanism: the rounds' ``RoundPrivacy.mechanism`` (``"gaussian"``, the default, or another
        user-level mechanism; see the module docstring).

    Returns:
      The noise multiplier (a float ``>= MIN_CALIBRATED_NOISE_MULTIPLIER``; if even that meets
      the target, it is returned).

    Raises:
      ValueError: an invalid argument (named in the message), or ``target_epsilon`` is not
        reachable with ``noise_multiplier <= max_noise_multiplier`` (e.g. a target below what
        the accountant can certify for any noise).

    Examples:
      >>> sigma = calibrate(3.0, delta=1e-5, rounds=14063, sampling="poisson",
      ...                   num_clients=60000, sampling_rate=256 / 60000, conversion="classic")
      >>> round(sigma, 2)
      1.1
    """
    if not _is_real(target_epsilon) or not 0.0 < float(target_epsilon) < math.inf:
        raise ValueError(f"target_epsilon={target_epsilon!r} must be a finite number > 0")
    target = float(target_epsilon)
    delta = _check_delta(delta)
    _check_accountant_and_conversion(accountant, conversion)
    rounds = _check_count("rounds", rounds)
    if not _is_real(tolerance) or not 0.0 < float(tolerance) < 1.0:
        raise ValueError(f"tolerance={tolerance!r} must be in (0, 1) (relative)")
    max_sigma = _check_positive_finite("max_noise_multiplier", max_noise_multiplier)
    if max_sigma < MIN_CALIBRATED_NOISE_MULTIPLIER:
        raise ValueError(
            f"max_noise_multiplier={max_noise_multiplier!r} must be >= "
            f"{MIN_CALIBRATED_NOISE_MULTIPLIER}"
        )
    template = RoundPrivacy(
        1.0,
        sampling,
        num_clients,
        sampling_rate=sampling_rate,
        cohort_size=cohort_size,
        compositions=compositions,
        unit=unit,
        **({} if mechanism == "gaussian" else {"mechanism": mechanism}),
    )
    if noise_profile is None:
        profile = None
    else:
        profile = [float(f) if _is_real(f) else f for f in noise_profile]
        if len(profile) != rounds:
            raise ValueError(
                f"noise_profile has {len(profile)} values; it needs one per round (rounds={rounds})"
            )
        bad = [f for f in profile if not _is_real(f) or not 0.0 < f < math.inf]
        if bad:
            raise ValueError(f"noise_profile has {bad[0]!r}; every factor must be finite and > 0")
    # Validates the combination (e.g. PLD with fixed-size user-level rounds) before searching.
    Accountant(delta=delta, accountant=accountant, conversion=conversion).compose(template)

    def schedule_at(sigma: float) -> tuple[tuple[RoundPrivacy, int], ...]:
        if profile is None:
            return ((dataclasses.replace(template, noise_multiplier=sigma), rounds),)
        return tuple(privacy_schedule(template, [sigma * f for f in profile]))

    epsilons: dict[tuple[tuple[RoundPrivacy, int], ...], float] = {}

    def epsilon_of(schedule: tuple[tuple[RoundPrivacy, int], ...]) -> float:
        if schedule not in epsilons:
            acc = Accountant(delta=delta, accountant=accountant, conversion=conversion)
            for rp, n in schedule:
                acc.compose(rp, n)
            epsilons[schedule] = acc.epsilon()
        return epsilons[schedule]

    def epsilon_at(sigma: float) -> float:
        return epsilon_of(schedule_at(sigma))

    # An explicit bracket [lo, hi] with epsilon(lo) > target >= epsilon(hi), by doubling.
    hi = min(1.0, max_sigma)
    lo = hi
    if epsilon_at(hi) > target:
        while epsilon_at(hi) > target:
            if hi >= max_sigma:
                raise ValueError(
                    f"target_epsilon={target!r} is not reachable with noise_multiplier <= "
                    f"max_noise_multiplier={max_sigma!r} (epsilon there is {epsilon_at(hi):.4g} "
                    f"at delta={delta!r} over {rounds} rounds); raise max_noise_multiplier, or "
                    "choose a larger target_epsilon, fewer rounds or a smaller sampling rate"
                )
            lo, hi = hi, min(2.0 * hi, max_sigma)
    else:
        while epsilon_at(lo) <= target:
            if lo <= MIN_CALIBRATED_NOISE_MULTIPLIER:
                return lo
            hi, lo = lo, max(lo / 2.0, MIN_CALIBRATED_NOISE_MULTIPLIER)

    cap = max(_EPSILON_CAP, 2.0 * target)

    def make_event(log_sigma: float) -> _ScheduleEvent:
        return _ScheduleEvent(schedule_at(math.exp(log_sigma)))

    log_sigma = _calibration.calibrate_dp_mechanism(
        lambda: _OurAccountant(delta, lambda sch: min(epsilon_of(sch), cap)),
        make_event,
        target,
        delta,
        bracket_interval=_calibration.ExplicitBracketInterval(math.log(lo), math.log(hi)),
        tol=math.log1p(float(tolerance)),
    )
    sigma = math.exp(log_sigma)
    if not epsilon_at(sigma) <= target:  # calibrate_dp_mechanism guarantees this; never relax it
        raise RuntimeError(
            f"calibration returned noise_multiplier={sigma!r} with epsilon "
            f"{epsilon_at(sigma)!r} > target_epsilon={target!r}"
        )
    return sigma


def noise_cohort(
    simulated: RoundPrivacy, *, noise_cohort_size: int, population: int | None = None
) -> tuple[float, RoundPrivacy]:
    """The noise-cohort trick: simulate a small cohort with the noise of a larger deployment.

    DP-FedAvg practice (McMahan, Ramage, Talwar, Zhang, ICLR 2018): experiments run with an
    expected cohort of ``m`` clients, but the Gaussian noise is scaled so that the noise on the
    *mean* update equals that of a deployment with an expected cohort of
    ``M = noise_cohort_size`` clients and noise multiplier ``sigma``: the engine divides the
    noisy sum by ``m``, so the simulation adds ``N(0, (sigma_sim C)^2)`` with
    ``sigma_sim = sigma * m / M``, and the noise on the mean is ``N(0, (sigma C / M)^2)`` as in
    the deployment. The signal-to-noise ratio of the mean is then roughly the deployment's (the
    mean of ``m`` clipped deltas estimates the mean of ``M``).

    What is accounted: the returned :class:`RoundPrivacy` describes the *deployment*: noise
    multiplier ``sigma`` (``simulated.noise_multiplier``), population ``N'`` (``population``,
    or by default the simulated population scaled by ``M / m``, which keeps the sampling rate)
    and either Poisson sampling with rate ``M / N'`` or a fixed cohort of ``M`` out of ``N'``.
    Its epsilon is a statement about that larger deployment, not about the simulated run. The
    simulated run itself adds only ``sigma_sim`` and is protected at the (much weaker) level of
    ``dataclasses.replace(simulated, noise_multiplier=sigma_sim)``.

    Args:
      simulated: the simulated round (``unit="user"``) with the deployment's noise multiplier.
      noise_cohort_size: ``M``, the deployment's (expected) cohort size; at least the
        simulated expected cohort ``m``.
      population: ``N'``, the deployment's population, ``>= M`` (``None``: ``round(N M / m)``).

    Returns:
      ``(sigma_sim, deployment)``: the noise multiplier the simulation must add, and the
      deployment's :class:`RoundPrivacy` to account.

    Raises:
      ValueError: naming the invalid argument (example-level rounds are refused: their noise
        is added per client and local step, not to the cohort's sum).
    """
    if not isinstance(simulated, RoundPrivacy):
        raise ValueError(f"simulated={simulated!r} must be a RoundPrivacy instance")  # noqa: TRY004
    if simulated.unit != "user":
        raise ValueError(
            f"simulated.unit={simulated.unit!r}: the noise-cohort trick applies to user-level "
            "DP (noise on the cohort's sum), not to example-level DP-SGD"
        )
    mechanism = getattr(simulated, "mechanism", "gaussian")
    if mechanism != "gaussian":
        raise ValueError(
            f"simulated.mechanism={mechanism!r}: the noise-cohort trick is implemented for the "
            "central Gaussian mechanism only"
        )
    m = simulated.participation_probability * simulated.num_clients  # expected cohort
    big_m = _check_count("noise_cohort_size", noise_cohort_size)
    if big_m < m:
        raise ValueError(
            f"noise_cohort_size={big_m} must be at least the simulated expected cohort size "
            f"{m:g}: the trick simulates a LARGER deployment"
        )
    if population is None:
        n_big = max(big_m, round(simulated.num_clients * big_m / m))
    else:
        n_big = _check_count("population", population)
        if n_big < big_m:
            raise ValueError(f"population={n_big} must be >= noise_cohort_size={big_m}")
    sigma_sim = simulated.noise_multiplier * m / big_m
    if simulated.sampling == "poisson":
        deployment = dataclasses.replace(
            simulated, num_clients=n_big, sampling_rate=big_m / n_big, cohort_size=None
        )
    else:
        deployment = dataclasses.replace(
            simulated, num_clients=n_big, sampling_rate=None, cohort_size=big_m
        )
    return sigma_sim, deployment
