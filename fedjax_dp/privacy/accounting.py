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

*Neighbouring relation* (default, ``"add_or_remove_one_user"``, ``ADD_OR_REMOVE_ONE``): ``D`` is
the run's population of ``N = num_clients`` users and ``D'`` is ``D`` with one user ``u``'s whole
data removed (``N - 1`` users) or with one user added (``N + 1`` users); the sampler's
parameters (``q``, or the cohort size ``m``, and the cap ``K``) are the same on both. Each
ordering of each pair is covered. Write ``G_s(p)`` for the *subsampled Gaussian pair*
``((1-p) N(0, s^2) + p N(1, s^2), N(0, s^2))`` and its reverse (sensitivity 1, rate ``p``; what
``dp_accounting`` accounts for ``PoissonSampledDpEvent(p, GaussianDpEvent(s))`` under
``ADD_OR_REMOVE_ONE``, with both its RDP and PLD accountants). Every bound below is a
*dominating pair* argument: the round's output distributions on ``D`` and ``D'`` are written as
the same mixture of pairs (same weights), joint convexity of the hockey-stick divergence (and of
``exp((alpha-1) D_alpha)``) bounds the round by the worst pair, and rotation invariance reduces
the worst pair to one dimension with the largest shift.

* **Poisson sampling**: the sum has add/remove sensitivity ``C``, and given the other users'
  selection the round is ``(1-q) N(s, .) + q N(s + x_u, .)`` versus ``N(s, .)``: ``G_sigma(q)``,
  ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``.
* **Fixed-size sampling** (``m = cohort_size`` uniformly without replacement; Zhu, Dong, Wang,
  "Optimal Accounting of Differential Privacy via Characteristic Functions", AISTATS 2022,
  subsampling without replacement under remove-one): let ``D`` have ``n`` users (the larger of
  the pair) and ``D' = D - u``. On ``D``, ``u`` is in the cohort with probability
  ``gamma = m / n``, and then the rest of the cohort is a uniform ``(m-1)``-subset of ``D'``; else
  the cohort is a uniform ``m``-subset of ``D'``, distributed as on ``D'``. Couple the two: draw
  a uniform ``m``-subset ``S`` of ``D'`` and a uniform ``j`` in ``S``; ``S - j`` is a uniform
  ``(m-1)``-subset. Given ``(S, j)`` the pair is ``(1-gamma) N(s_S, .) + gamma N(s_S - x_j +
  x_u, .)`` versus ``N(s_S, .)`` with ``||x_u - x_j|| <= 2C``, so the round is dominated by the
  subsampled Gaussian of sensitivity ``2C`` at rate ``m / n``: ``G_{sigma/2}(m / n)``. It is
  tight: with ``x_u = +C e`` and every other delta ``-C e`` the round *is* that pair. The pair
  (``N``, ``N - 1``) has ``n = N``; (``N + 1``, ``N``) has rate ``m / (N + 1)``, which is
  dominated (a smaller rate is post-processing of a larger one), so a round is
  ``PoissonSampledDpEvent(m / N, GaussianDpEvent(sigma / 2))`` -- an event with the same
  dominating pair, not a description of the sampler -- accounted by RDP or PLD. (With
  ``m = N`` the pair with ``N - 1`` users does not exist and ``gamma = 1`` is an upper bound.)
  Unlike Poisson sampling the sensitivity is ``2C``: removing ``u`` lets another user take its
  place in the cohort.
* **Fixed-size sampling, replace-one** (``relation="replace_one_user"``, ``REPLACE_ONE``: one
  user's data replaced by arbitrary other data, the population size public) is a different
  relation and keeps its previous analysis: RDP only (Wang, Balle, Kasiviswanathan, "Subsampled
  Renyi DP", AISTATS 2019, Thm. 27, as implemented in ``dp_accounting``), whose
  ``GaussianDpEvent.noise_multiplier`` is the noise standard deviation divided by the
  replace-one sensitivity ``2C``:
  ``SampledWithoutReplacementDpEvent(num_clients, cohort_size, GaussianDpEvent(sigma / 2))``.
  ``accountant="pld"`` raises a ``ValueError`` for it. It reports 1.2-3.4x the add/remove
  RDP epsilon above in the settings of ``tests/accounting_test.py``.

*Poisson sampling with a cap* (``max_cohort_size = K``): the sampler pads the cohort to ``K`` and,
when more than ``K`` clients are selected, keeps a uniformly random subset of ``K`` (the rest
are dropped). This is exactly the mechanism of ``dp_accounting``'s
``TruncatedSubsampledGaussianDpEvent`` (:meth:`RoundPrivacy.dp_event`). Let ``D`` have ``n``
users including ``u``, ``D' = D - u``, and ``B ~ Binomial(n - 1, q)`` the number of other users
selected. Condition on ``T = [B >= K]`` (revealing ``T`` only loosens the bound):

* ``B <= K - 1`` (probability ``1 - p_t``): nothing is dropped on either side; given the others'
  selection the pair is ``G_sigma(q)`` as without a cap.
* ``B >= K`` (probability ``p_t = P(B >= K)``): on ``D'`` the cohort is a uniform ``K``-subset of
  ``D'`` whatever ``B``; on ``D``, ``u`` is kept with probability ``q K / (B + 1)`` and then
  joined by a uniform ``(K-1)``-subset of ``D'``, else the cohort is as on ``D'``. Averaged over
  ``B``, ``u`` is kept with probability ``q_trunc = E[q K / (B + 1) | B >= K] = K P(Binomial(n,
  q) >= K + 1) / (n p_t)``, and the coupling of the fixed-size case gives
  ``G_{sigma/2}(q_trunc)`` (sensitivity ``2C``).

So a round is the mixture, with the branch revealed, of ``G_sigma(q)`` (weight ``1 - p_t``) and
``G_{sigma/2}(q_trunc)`` (weight ``p_t``). PLD: ``PrivacyLossDistribution.compute_mixture`` of
the two PLDs. RDP: ``log((1 - p_t) exp((alpha-1) R_1) + p_t exp((alpha-1) R_2)) / (alpha - 1)``
(joint convexity). ``dp_accounting``'s own PLD for the event bounds the second branch by a
replace-one pair instead (a valid but looser bound, which :class:`Accountant` does not use).
``p_t`` and ``q_trunc`` depend on the number of other users, ``N - 1`` for the pair (``N``,
``N - 1``) and ``N`` for (``N + 1``, ``N``), and neither pair dominates the other: RDP takes the
larger RDP of the two at each order; PLD composes each pair over all rounds and reports the
larger epsilon. When ``p_t <= 1e-12`` (the sampler's default cap, mean + 8 standard
deviations, gives about ``1e-13``) PLD instead bounds the truncated branch by infinite privacy
loss with weight ``p_t`` of the ``N + 1`` pair, which covers both pairs with one composition
and adds at most ``count * p_t`` to delta. A cap that cannot truncate (``K >= N + 1``) changes
nothing.

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
size; with a cap ``K`` on a Poisson cohort the probability of being in the kept cohort,
``(1 - p_t) q + p_t q_trunc``, computed for the population of ``N`` clients, which the zero-out
relation leaves unchanged, and independent of the data), one round is the pair ``P = (1-p) X + p Y``, ``Q = (1-p) X + p Y'``. Its privacy loss is, by
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
  of one user (``LaplaceDpEvent(sigma)``; the worst L1 shift is along one coordinate). The
  dominating pairs are those of the Gaussian case with Laplace noise, ``L_b(p) = ((1-p) Lap(0,
  b) + p Lap(1, b), Lap(0, b))`` and its reverse: Poisson ``L_sigma(q)``; fixed size under
  add/remove ``L_{sigma/2}(m / N)`` (the same coupling, L1 shift ``2C``); Poisson with a cap the
  revealed mixture of ``L_sigma(q)`` and ``L_{sigma/2}(q_trunc)``. PLD: ``dp_accounting``'s
  ``from_laplace_mechanism(..., sampling_prob=p)`` (and mixtures). RDP: ``dp_accounting`` has
  no RDP of the subsampled Laplace, so it is computed here numerically as a certified upper
  bound (:func:`_subsampled_laplace_rdp`: the likelihood ratio is constant outside ``[0, 1]``,
  and on ``[0, 1]`` the log-integrands are convex (forward) or concave (reverse), so chords and
  tangents on 1000 cells bound the integrals from above; relative error about ``1e-5``; exact
  at ``p = 1``). Fixed size under ``relation="replace_one_user"`` keeps the previous
  ``LaplaceDpEvent(sigma / 2)`` without amplification (RDP only). Rounds that are all Laplace
  also satisfy pure DP by basic composition, ``sum_t eps_t`` with ``eps_t =``
  :attr:`RoundPrivacy.pure_epsilon` (``log(1 + p (e^{e_0} - 1))``, the amplification of pure DP
  by subsampling, with ``(p, e_0) = (q, 1 / sigma)`` for Poisson, ``(m / N, 2 / sigma)`` for
  fixed size, the larger of both branches with a cap, ``2 / sigma`` under replace-one); the
  accountant reports the smaller of that and its RDP/PLD epsilon (both are upper bounds).
* ``"local_gaussian"`` (local DP): every client adds ``N(0, (sigma C)^2 I)`` to its own update
  clipped to L2 norm ``C`` (a cap changes nothing: every round is counted). The guarantee is per client, for its released updates, with respect
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

One :class:`Accountant` holds rounds of one unit and one neighbouring relation
(:attr:`RoundPrivacy.neighboring_relation`); under add/remove, Poisson, capped Poisson and
fixed-size rounds compose with each other. Serialised rounds (:meth:`RoundPrivacy.to_dict`,
:meth:`Accountant.state_dict`) written before ``max_cohort_size`` and ``relation`` existed load
unchanged and get today's analysis: their fixed-size user-level rounds, accounted under
replace-one when they were written, now refer to add/remove (pass
``relation="replace_one_user"`` for the former analysis).

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
from scipy import special as _special
from scipy import stats as _stats


class _DropOrderExclusionNotices(logging.Filter):
    """dp_accounting logs a warning each time a fractional RDP order fails to converge and is
    excluded from the minimum over orders. That is benign (the bound stays valid, the
    remaining orders still give it) and would flood every run's output, so it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in str(record.msg)


logging.getLogger("absl").addFilter(_DropOrderExclusionNotices())

__all__ = [
    "MIN_CALIBRATED_NOISE_MULTIPLIER",
    "NEIGHBORING_RELATIONS",
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

#: The neighbouring relations an epsilon can refer to (:attr:`RoundPrivacy.neighboring_relation`).
NEIGHBORING_RELATIONS: tuple[str, ...] = (
    "add_or_remove_one_user",
    "replace_one_user",
    "zero_out_example",
    "local_replace_one_user",
)

# The two kinds of add/remove pairs of a user-level round over a population D of N users:
# "remove" is (D, D minus one user), "add" is (D plus one user, D). Their dominating pairs differ
# only for fixed-size and capped Poisson rounds (the number of other users differs by one).
_SIDES = ("remove", "add")

# A capped Poisson round whose truncation probability (given that the target user is selected)
# is at most this is accounted by PLD with the truncated branch replaced by infinite privacy
# loss: a valid bound for both sides at the cost of at most count * p_t of delta (1e-8 over 1e4
# rounds), instead of two exact compositions. RDP always uses the exact mixture.
_TRUNCATION_AS_NON_PRIVATE = 1e-12

# Cells of the numerical upper bound on the RDP of the subsampled Laplace mechanism.
_LAPLACE_RDP_CELLS = 1000


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
    the analysis each combination of ``unit``, ``sampling``, ``mechanism``, ``max_cohort_size``
    and ``relation`` receives.

    Attributes:
      noise_multiplier: sigma, the standard deviation of the Gaussian noise on the summed, clipped
        contributions divided by the clipping norm (per round for ``unit="user"``; per local step
        for ``unit="example"``). ``0`` is allowed and means the round is not private
        (epsilon = inf).
      sampling: ``"poisson"`` or ``"fixed"``.
      num_clients: the population size ``N``.
      sampling_rate: ``q`` in ``(0, 1]``; required for ``"poisson"``. For ``"fixed"`` it may be
        left ``None`` or must equal ``cohort_size / num_clients``.
      cohort_size: required for ``"fixed"``, in ``[1, num_clients]``; must be ``None`` for
        ``"poisson"`` (use ``max_cohort_size`` for a Poisson sampler's cap).
      compositions: ``E``, how many Gaussian mechanisms each protected unit passes through per
        round (``1`` for user level, the number of local epochs for example level).
      unit: ``"user"`` or ``"example"``, the unit of protection.
      mechanism: ``"gaussian"`` (default), ``"laplace"`` (``noise_multiplier`` is the Laplace
        scale divided by the L1 clip norm) or ``"local_gaussian"`` (every client noises its own
        update; a per-client local-DP guarantee). The last two need ``unit="user"`` and
        ``compositions=1``; see the module docstring.
      max_cohort_size: ``K``, Poisson only: the sampler keeps at most ``K`` clients, a uniformly
        random subset of ``K`` of the selected ones when more are selected (the rest are
        dropped). ``None`` (default): no cap. The truncation is accounted exactly (module
        docstring, "Poisson sampling with a cap").
      relation: the neighbouring relation to account under, one of
        :data:`NEIGHBORING_RELATIONS`; ``None`` (default) picks the round's default,
        ``"zero_out_example"`` for example level, ``"local_replace_one_user"`` for
        ``mechanism="local_gaussian"`` and ``"add_or_remove_one_user"`` otherwise.
        ``"replace_one_user"`` is accepted for fixed-size central user-level rounds (the RDP
        analysis of sampling without replacement under replace-one; RDP only). It is
        normalised to its explicit value, see :attr:`neighboring_relation`.
      upload_probability: ``p`` in ``(0, 1]``, Poisson only: after the sampler (and its cap),
        every kept client uploads independently with probability ``p`` (dropouts, dropped
        stragglers; :mod:`fedjax_dp.systems`), independently of the data. Without a cap, the
        uploads are a Poisson sample at rate ``q p``. With a cap, the branch where the cap
        does not bind (``B <= K - 1``, ``B`` counted before thinning) is the subsampled
        mechanism at rate ``q p``; the truncated branch keeps its un-thinned analysis at
        ``q_trunc`` (every client's contribution is still in ``{0} U ball(C)``, so the
        coupling of the module docstring holds with random contributions; thinning is not
        credited there). ``p_t`` is computed from ``q``. Default ``1``.
    """

    noise_multiplier: float
    sampling: str
    num_clients: int
    sampling_rate: float | None = None
    cohort_size: int | None = None
    compositions: int = 1
    unit: str = "user"
    mechanism: str = "gaussian"
    max_cohort_size: int | None = None
    relation: str | None = None
    upload_probability: float = 1.0

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
                    "with sampling='poisson' (a Poisson sampler's cap is max_cohort_size)"
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
        cap = self.max_cohort_size
        if cap is not None:
            if self.sampling != "poisson":
                raise ValueError(
                    f"max_cohort_size={cap!r} is a cap on a Poisson cohort; pass "
                    "max_cohort_size=None with sampling='fixed' (its cohort size is cohort_size)"
                )
            if not _is_int(cap) or cap < 1:
                raise ValueError(
                    f"max_cohort_size={cap!r} must be an integer >= 1 (or None: no cap)"
                )
            object.__setattr__(self, "max_cohort_size", int(cap))
        p_up = self.upload_probability
        if not _is_real(p_up) or not 0.0 < float(p_up) <= 1.0:
            raise ValueError(
                f"upload_probability={p_up!r} must be in (0, 1] (the probability that a kept "
                "client uploads)"
            )
        if float(p_up) != 1.0 and (
            self.sampling != "poisson" or self.unit != "user" or self.mechanism == "local_gaussian"
        ):
            raise ValueError(
                f"upload_probability={p_up!r} is only credited for central user-level rounds "
                "with sampling='poisson'; pass upload_probability=1 (no thinning credit)"
            )
        object.__setattr__(self, "upload_probability", float(p_up))
        default = _default_relation(self.unit, self.mechanism)
        relation = default if self.relation is None else self.relation
        allowed = {default}
        if self.unit == "user" and self.mechanism != "local_gaussian" and self.sampling == "fixed":
            allowed.add("replace_one_user")
        if relation not in allowed:
            raise ValueError(
                f"relation={self.relation!r} is not available for this round (unit={self.unit!r}, "
                f"mechanism={self.mechanism!r}, sampling={self.sampling!r}); use one of "
                f"{sorted(allowed)} or None"
            )
        object.__setattr__(self, "relation", relation)

    @property
    def participation_probability(self) -> float:
        """The probability that the sampler selects a given client, before any cap.

        ``q`` for Poisson, ``cohort_size / num_clients`` for fixed size. With a cap
        (``max_cohort_size``) the probability that a client ends up in the cohort is smaller;
        the accountant uses that exact value where it matters (example level).
        """
        if self.sampling == "poisson":
            return float(self.sampling_rate)
        return self.cohort_size / self.num_clients

    @property
    def effective_noise_multiplier(self) -> float:
        """``sigma / sqrt(compositions)``: the single Gaussian equivalent to the E Gaussians."""
        return self.noise_multiplier / math.sqrt(self.compositions)

    @property
    def upload_rate(self) -> float:
        """Poisson: ``q * upload_probability``, the rate of the uploads when the cap does not
        bind; fixed size: ``cohort_size / num_clients``."""
        if self.sampling == "poisson":
            return float(self.sampling_rate) * self.upload_probability
        return self.participation_probability

    @property
    def neighboring_relation(self) -> str:
        """The neighbouring relation the epsilon of this round refers to (:attr:`relation`).

        ``"add_or_remove_one_user"``: the run's population ``D`` of ``num_clients`` users versus
        ``D`` with one user removed or one user added (``N - 1`` or ``N + 1`` users; a fixed-size
        cohort keeps its size ``cohort_size``). ``"replace_one_user"``: one user's data replaced
        (population size public). ``"zero_out_example"``: one example replaced by a null
        example. ``"local_replace_one_user"``: one client's released updates, its data replaced.
        """
        return str(self.relation)

    @property
    def pure_epsilon(self) -> float | None:
        """For ``mechanism="laplace"``: the round's pure-DP epsilon (``delta = 0``), else None.

        With ``eps_0 = 1 / sigma`` and ``A(p, e) = log(1 + p (exp(e) - 1))`` (amplification of
        pure DP by subsampling): Poisson ``A(q, eps_0)``; fixed size under add/remove
        ``A(cohort_size / num_clients, 2 eps_0)``; fixed size under replace-one ``2 eps_0``
        (no amplification claimed); Poisson with a cap that can truncate the cohort
        ``max(A(q, eps_0), A(q_trunc, 2 eps_0))`` (module docstring); ``inf`` for ``sigma = 0``.
        """
        if self.mechanism != "laplace":
            return None
        if self.noise_multiplier == 0:
            return math.inf
        eps0 = 1.0 / self.noise_multiplier
        if self.sampling == "fixed":
            if self.relation == "replace_one_user":
                return 2.0 * eps0
            return _amplified_pure(self.cohort_size / self.num_clients, 2.0 * eps0)
        eps = _amplified_pure(self.upload_rate, eps0)
        for p_t, q_trunc in _truncation_sides(self):
            if p_t > 0:
                eps = max(eps, _amplified_pure(q_trunc, 2.0 * eps0))
        return eps

    def dp_event(self) -> dp_accounting.DpEvent:
        """Returns one round's ``dp_accounting`` event (to account under ``ADD_OR_REMOVE_ONE``
        unless stated).

        * ``noise_multiplier == 0``: ``NonPrivateDpEvent``.
        * user level, Poisson: ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma / sqrt(E)))``.
        * user level, Poisson with ``max_cohort_size = K``:
          ``TruncatedSubsampledGaussianDpEvent(num_clients, q, K, sigma / sqrt(E))``, whose
          semantics (keep a uniformly random subset of ``K``) are exactly the sampler's. It
          covers the pair (``N`` users, ``N - 1``); :class:`Accountant` also covers
          (``N + 1``, ``N``) and is tighter than ``dp_accounting``'s PLD of this event.
        * user level, fixed size, add/remove: ``PoissonSampledDpEvent(cohort_size / num_clients,
          GaussianDpEvent(sigma / (2 sqrt(E))))``. This is NOT a description of the sampling: it
          is the event with the same (tight) dominating pair as the round, the subsampled
          Gaussian of sensitivity ``2C`` at rate ``m / N`` (module docstring).
        * user level, fixed size, ``relation="replace_one_user"``:
          ``SampledWithoutReplacementDpEvent(num_clients, cohort_size,
          GaussianDpEvent(sigma / (2 sqrt(E))))``, to account under ``REPLACE_ONE`` with RDP.
        * example level: the event given that the client participates, ``GaussianDpEvent(sigma)``
          self-composed ``E`` times (zero-out one example). It ignores client sampling and so
          upper-bounds the round; :class:`Accountant` uses the tighter participation-revealed
          bound described in the module docstring, for which ``dp_accounting`` has no event.
        * ``mechanism="laplace"``: Poisson ``PoissonSampledDpEvent(q, LaplaceDpEvent(sigma))``;
          Poisson with a cap that can truncate ``PoissonSampledDpEvent(q,
          LaplaceDpEvent(sigma / 2))`` (an upper bound: ``dp_accounting`` has no truncated
          Laplace event); fixed size ``PoissonSampledDpEvent(cohort_size / num_clients,
          LaplaceDpEvent(sigma / 2))`` (same dominating pair, as for the Gaussian); fixed size
          under replace-one ``LaplaceDpEvent(sigma / 2)`` (no amplification).
        * ``mechanism="local_gaussian"``: ``GaussianDpEvent(sigma / 2)`` for every round, whatever
          the sampling (one client's release, replace its data: sensitivity ``2C``).
        """
        if self.noise_multiplier == 0:
            return dp_accounting.NonPrivateDpEvent()
        if self.mechanism == "local_gaussian":
            return dp_accounting.GaussianDpEvent(self.noise_multiplier / 2.0)
        if self.unit == "example":
            gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
            if self.compositions == 1:
                return gaussian
            return dp_accounting.SelfComposedDpEvent(gaussian, self.compositions)
        laplace = self.mechanism == "laplace"
        s = self.noise_multiplier if laplace else self.effective_noise_multiplier
        noise = dp_accounting.LaplaceDpEvent if laplace else dp_accounting.GaussianDpEvent
        if self.sampling == "fixed":
            if self.relation == "replace_one_user":
                if laplace:
                    return dp_accounting.LaplaceDpEvent(s / 2.0)
                return dp_accounting.SampledWithoutReplacementDpEvent(
                    self.num_clients, self.cohort_size, dp_accounting.GaussianDpEvent(s / 2.0)
                )
            return dp_accounting.PoissonSampledDpEvent(
                self.cohort_size / self.num_clients, noise(s / 2.0)
            )
        q = float(self.sampling_rate)
        if self.max_cohort_size is not None:
            if not laplace:
                return dp_accounting.TruncatedSubsampledGaussianDpEvent(
                    self.num_clients, q, self.max_cohort_size, s
                )
            if any(p_t > 0 for p_t, _ in _truncation_sides(self)):
                return dp_accounting.PoissonSampledDpEvent(q, noise(s / 2.0))
        return dp_accounting.PoissonSampledDpEvent(self.upload_rate, noise(s))

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as a JSON-serialisable dict.

        ``max_cohort_size`` is left out when ``None``, ``relation`` when it is the round's
        default and ``upload_probability`` when ``1``, so dicts of rounds without them read as
        before these fields existed.
        """
        d = dataclasses.asdict(self)
        if d["upload_probability"] == 1.0:
            del d["upload_probability"]
        if d["max_cohort_size"] is None:
            del d["max_cohort_size"]
        if d["relation"] == _default_relation(self.unit, self.mechanism):
            del d["relation"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundPrivacy:
        """Inverse of :meth:`to_dict` (missing optional fields take their defaults)."""
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


def _default_relation(unit: str, mechanism: str) -> str:
    if unit == "example":
        return "zero_out_example"
    if mechanism == "local_gaussian":
        return "local_replace_one_user"
    return "add_or_remove_one_user"


def _amplified_pure(p: float, eps0: float) -> float:
    """``log(1 + p (exp(eps0) - 1))``: pure DP amplified by subsampling with probability p."""
    return math.log1p(p * math.expm1(eps0))


def _truncation(n_others: int, q: float, cap: int) -> tuple[float, float]:
    """``(p_t, q_trunc)`` of a Poisson round with rate ``q`` capped at ``cap`` clients.

    ``n_others`` is the number of users other than the target user ``u`` in the larger of the
    two neighbouring populations; ``B ~ Binomial(n_others, q)`` is how many of them are
    selected. ``p_t = P(B >= cap)`` is the probability that the cohort is truncated whenever
    ``u`` is selected; ``q_trunc = E[q cap / (B + 1) | B >= cap]`` is the probability that ``u``
    is in the kept cohort given ``B >= cap``, which is
    ``cap P(Binomial(n_others + 1, q) >= cap + 1) / ((n_others + 1) p_t)``. It is raised to its
    lower bound ``q cap / (n_others + 1)`` if floating point put it below (a larger rate only
    loosens the bound).
    """
    p_t = float(_stats.binom.sf(cap - 1, n_others, q))
    if not p_t > 0.0:
        return 0.0, 0.0
    q_trunc = cap * float(_stats.binom.sf(cap, n_others + 1, q)) / ((n_others + 1) * p_t)
    q_trunc = max(q_trunc, q * cap / (n_others + 1))
    return min(p_t, 1.0), min(q_trunc, 1.0)


def _truncation_sides(rp: RoundPrivacy) -> tuple[tuple[float, float], ...]:
    """``_truncation`` for the two neighbouring pairs of a capped Poisson round, ``()`` without
    a cap: (``N`` users, ``N - 1``) and (``N + 1``, ``N``), ``N = num_clients`` (see
    :data:`_SIDES`)."""
    if rp.sampling != "poisson" or rp.max_cohort_size is None:
        return ()
    q, cap = float(rp.sampling_rate), rp.max_cohort_size
    return tuple(_truncation(rp.num_clients + offset, q, cap) for offset in (-1, 0))


def _inclusion_probability(rp: RoundPrivacy) -> float:
    """The probability that a given client is in the (kept) cohort of the round.

    Without a cap, :attr:`RoundPrivacy.participation_probability`. With a cap ``K`` on a Poisson
    cohort of the population of ``N`` clients (fixed under zero-out):
    ``(1 - p_t) q + p_t q_trunc = q P(B <= K - 1) + K P(Binomial(N, q) >= K + 1) / N``.
    """
    if rp.sampling != "poisson" or rp.max_cohort_size is None:
        return rp.participation_probability
    p_t, q_trunc = _truncation(rp.num_clients - 1, float(rp.sampling_rate), rp.max_cohort_size)
    if p_t == 0.0:
        return float(rp.sampling_rate)
    return min(1.0, (1.0 - p_t) * float(rp.sampling_rate) + p_t * q_trunc)


def _example_rdp(rp: RoundPrivacy, orders: np.ndarray) -> np.ndarray:
    """Per-round RDP of the participation-revealed Gaussian (see the module docstring)."""
    g = _subsampled_gaussian_rdp(1.0, rp.effective_noise_multiplier)
    p = _inclusion_probability(rp)
    if p == 1.0:
        return g
    log_mix = np.logaddexp(math.log1p(-p), math.log(p) + (orders - 1.0) * g)
    return log_mix / (orders - 1.0)


def _subsampled_gaussian_rdp(q: float, sigma: float) -> np.ndarray:
    """RDP of the pair ``((1-q) N(0, sigma^2) + q N(1, sigma^2), N(0, sigma^2))``, both
    directions (``dp_accounting``'s Poisson subsampled Gaussian; ``q = 1``: the Gaussian)."""
    acc = _rdp_lib.RdpAccountant(list(RDP_ORDERS), _NeighborRel.ADD_OR_REMOVE_ONE)
    acc.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        if q < 1.0
        else dp_accounting.GaussianDpEvent(sigma)
    )
    return np.asarray(acc.rdp, dtype=np.float64)


def _log_mean_factor(z: np.ndarray) -> np.ndarray:
    """``log((1 - exp(-z)) / z)`` for ``z >= 0`` (``0`` at ``z = 0``)."""
    big = z > 1e-8
    zs = np.where(big, z, 1.0)
    return np.where(big, np.log(-np.expm1(-zs)) - np.log(zs), -z / 2.0)


def _log_sinhc(y: np.ndarray) -> np.ndarray:
    """``log(sinh(y) / y)`` (``0`` at ``y = 0``)."""
    y = np.abs(y)
    big = y > 1e-4
    ys = np.where(big, y, 1.0)
    return np.where(big, ys + np.log(-np.expm1(-2.0 * ys)) - np.log(2.0 * ys), y * y / 6.0)


def _subsampled_laplace_rdp(q: float, scale: float, cells: int = _LAPLACE_RDP_CELLS) -> np.ndarray:
    """An upper bound on the RDP of the subsampled Laplace pair, both directions, at
    :data:`RDP_ORDERS`.

    The pair is ``P = (1-q) Lap(0, scale) + q Lap(1, scale)`` versus ``Q = Lap(0, scale)``
    (sensitivity 1). With ``t = 1 / scale`` the likelihood ratio is ``r(x) = 1 - q + q
    exp(t (|x| - |x - 1|))``: constant ``r_-`` on ``x <= 0`` (``Q``-mass ``1/2``), constant
    ``r_+`` on ``x >= 1`` (``Q``-mass ``exp(-t) / 2``), and ``1 - q + q exp(t (2x - 1))`` on
    ``(0, 1)``. So ``exp((a - 1) D_a(P || Q)) = E_Q[r^a]`` and
    ``exp((a - 1) D_a(Q || P)) = E_Q[r^(1-a)]`` are two point masses plus an integral over
    ``(0, 1)``. On ``(0, 1)``, ``log r`` is convex, so the log of the forward integrand
    ``r^a q`` is convex (bounded on each cell by its chord) and that of the reverse integrand
    ``r^(1-a) q`` is concave (bounded by its tangent at the cell's midpoint); both bounds
    integrate in closed form, so the sum over ``cells`` cells is an upper bound with relative
    error ``O(a t^2 / cells^2)``. ``q = 1`` gives the Laplace RDP exactly (Mironov 2017,
    Prop. 6).
    """
    a = np.asarray(RDP_ORDERS, dtype=np.float64)[:, None]
    t = 1.0 / scale
    log_q, log_1mq = math.log(q), (math.log1p(-q) if q < 1.0 else -math.inf)

    def log_r(x):
        return np.logaddexp(log_1mq, log_q + t * (2.0 * np.asarray(x) - 1.0))

    lr_minus, lr_plus = float(log_r(0.0)), float(log_r(1.0))
    h = 1.0 / cells
    x = np.linspace(0.0, 1.0, cells + 1)
    log_dq = math.log(t / 2.0) - t * x  # the density of Q on (0, 1)
    lf = a * log_r(x) + log_dq  # [A, cells + 1]
    lo, hi = lf[:, :-1], lf[:, 1:]
    fwd_cells = np.maximum(lo, hi) + _log_mean_factor(np.abs(hi - lo)) + math.log(h)
    xm = (x[:-1] + x[1:]) / 2.0
    lrm = log_r(xm)
    slope_log_r = 2.0 * t * np.exp(log_q + t * (2.0 * xm - 1.0) - lrm)
    lg = (1.0 - a) * lrm + math.log(t / 2.0) - t * xm
    slope = (1.0 - a) * slope_log_r - t
    rev_cells = lg + math.log(h) + _log_sinhc(slope * h / 2.0)
    fwd = _special.logsumexp(
        np.concatenate(
            [fwd_cells, math.log(0.5) + a * lr_minus, math.log(0.5) - t + a * lr_plus],
            axis=1,
        ),
        axis=1,
    )
    rev = _special.logsumexp(
        np.concatenate(
            [
                rev_cells,
                math.log(0.5) + (1.0 - a) * lr_minus,
                math.log(0.5) - t + (1.0 - a) * lr_plus,
            ],
            axis=1,
        ),
        axis=1,
    )
    return np.maximum(np.maximum(fwd, rev) / (a[:, 0] - 1.0), 0.0)


def _mixture_rdp(rdp_a: np.ndarray, rdp_b: np.ndarray, weight_b: float) -> np.ndarray:
    """RDP bound of a mixture of two pairs whose component is revealed (joint convexity of
    ``exp((alpha - 1) D_alpha)``): ``(1 - w) pair_a + w pair_b``."""
    orders = np.asarray(RDP_ORDERS, dtype=np.float64)
    if weight_b >= 1.0:
        return rdp_b
    with np.errstate(over="ignore", invalid="ignore"):
        log_mix = np.logaddexp(
            math.log1p(-weight_b) + (orders - 1.0) * rdp_a,
            math.log(weight_b) + (orders - 1.0) * rdp_b,
        )
    return log_mix / (orders - 1.0)


def _central_user_rdp(rp: RoundPrivacy) -> np.ndarray:
    """RDP of a central user-level round (Gaussian or Laplace), add/remove one user."""
    laplace = rp.mechanism == "laplace"
    s = rp.noise_multiplier if laplace else rp.effective_noise_multiplier
    branch = _subsampled_laplace_rdp if laplace else _subsampled_gaussian_rdp
    if rp.sampling == "fixed":
        return branch(rp.cohort_size / rp.num_clients, s / 2.0)
    base = branch(rp.upload_rate, s)
    sides = [
        base if p_t == 0.0 else _mixture_rdp(base, branch(q_trunc, s / 2.0), p_t)
        for p_t, q_trunc in _truncation_sides(rp)
    ]
    return np.maximum.reduce(sides) if sides else base


def _non_private_pld() -> _pld_lib.PrivacyLossDistribution:
    """The PLD with all its mass at infinite privacy loss (any pair is dominated by it)."""
    return _pld_lib.from_privacy_parameters(
        dp_accounting.pld.common.DifferentialPrivacyParameters(0.0, 1.0),
        value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL,
    )


def _pld_sides(rp: RoundPrivacy) -> tuple[str, ...]:
    """The sides (:data:`_SIDES`) on which this round's PLD differs and may matter.

    Fixed-size rounds differ (rate ``m / N`` versus ``m / (N + 1)``) but the ``"remove"`` side
    dominates, so they need the ``"add"`` side only next to a round that needs both. A capped
    Poisson round needs both sides unless its truncation probability is 0 or at most
    :data:`_TRUNCATION_AS_NON_PRIVATE` (then one PLD bounds both, see :func:`_round_pld`).
    """
    sides = _truncation_sides(rp)
    if rp.unit != "user" or rp.mechanism == "local_gaussian" or not sides:
        return ("remove",)
    if max(p_t for p_t, _ in sides) <= _TRUNCATION_AS_NON_PRIVATE:
        return ("remove",)
    return _SIDES


def _round_pld(rp: RoundPrivacy, side: str = "remove") -> _pld_lib.PrivacyLossDistribution:
    """One round's privacy loss distribution (``noise_multiplier > 0``).

    ``side`` (user level, add/remove): ``"remove"`` for the pair (the run's population of
    ``N`` users, ``N - 1`` users), ``"add"`` for (``N + 1``, ``N``).
    """
    vdi = PLD_VALUE_DISCRETIZATION_INTERVAL
    if rp.mechanism == "local_gaussian":
        return _pld_lib.from_gaussian_mechanism(
            standard_deviation=rp.noise_multiplier / 2.0, value_discretization_interval=vdi
        )
    if rp.unit == "example":
        gaussian = _pld_lib.from_gaussian_mechanism(
            standard_deviation=rp.effective_noise_multiplier,
            value_discretization_interval=vdi,
            neighboring_relation=_NeighborRel.REPLACE_SPECIAL,
        )
        p = _inclusion_probability(rp)
        if p == 1.0:
            return gaussian
        return gaussian.compute_mixture(_pld_lib.identity(vdi), p)
    if rp.relation != "add_or_remove_one_user":  # refused by Accountant.compose
        raise ValueError(f"no PLD analysis for relation={rp.relation!r}")
    laplace = rp.mechanism == "laplace"
    s = rp.noise_multiplier if laplace else rp.effective_noise_multiplier

    def branch(rate: float, scale: float) -> _pld_lib.PrivacyLossDistribution:
        if laplace:
            return _pld_lib.from_laplace_mechanism(
                parameter=scale, value_discretization_interval=vdi, sampling_prob=rate
            )
        return _pld_lib.from_gaussian_mechanism(
            standard_deviation=scale,
            value_discretization_interval=vdi,
            sampling_prob=rate,
            neighboring_relation=_NeighborRel.ADD_OR_REMOVE_ONE,
        )

    if rp.sampling == "fixed":
        population = rp.num_clients if side == "remove" else rp.num_clients + 1
        return branch(rp.cohort_size / population, s / 2.0)
    base = branch(rp.upload_rate, s)
    sides = _truncation_sides(rp)
    if not sides:
        return base
    p_max = max(p_t for p_t, _ in sides)  # the "add" side: more other users
    if p_max == 0.0:
        return base
    if p_max <= _TRUNCATION_AS_NON_PRIVATE:
        # Truncated branch bounded by infinite privacy loss: valid for both sides, and it costs
        # at most count * p_max of delta.
        return base.compute_mixture(_non_private_pld(), 1.0 - p_max)
    p_t, q_trunc = sides[_SIDES.index(side)]
    if p_t == 0.0:
        return base
    return branch(q_trunc, s / 2.0).compute_mixture(base, p_t)


class Accountant:
    """Host-side incremental accountant over rounds.

    Rounds are stored as a list of ``(RoundPrivacy, count)``; consecutive composes of an identical
    ``RoundPrivacy`` are merged, so PLD self-composes them at once instead of round by round.
    :meth:`epsilon` is computed lazily and cached until the next :meth:`compose`; per-round RDP
    vectors and the PLD of all but the last schedule entry are cached, so calling it every round
    stays cheap.

    All rounds composed into one accountant must have the same ``unit`` and the same
    :attr:`RoundPrivacy.neighboring_relation` (an add/remove guarantee and a replace-one
    guarantee do not compose into one number). Poisson, capped Poisson and fixed-size rounds
    under add/remove do compose: the epsilon is the largest over the two kinds of add/remove
    pairs (the run's population with one user removed, or with one user added), each composed
    over all rounds. To report both user- and example-level guarantees, use two accountants.
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
        self._pld_base_cache: dict[tuple[RoundPrivacy, str], _pld_lib.PrivacyLossDistribution]
        self._pld_base_cache = {}
        # Per side: the composition of the first ``length`` schedule entries.
        self._pld_prefix: dict[str, tuple[_pld_lib.PrivacyLossDistribution | None, int]] = {
            side: (None, 0) for side in _SIDES
        }

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
                    f"round_privacy gives a {round_privacy.neighboring_relation} guarantee "
                    f"(sampling={round_privacy.sampling!r}) but this accountant already holds "
                    f"{first.neighboring_relation} rounds; use one neighbouring relation per "
                    "accountant"
                )
        if (
            self._accountant == "pld"
            and round_privacy.neighboring_relation == "replace_one_user"
            and round_privacy.noise_multiplier > 0
        ):
            raise ValueError(
                "accountant='pld' has no analysis of fixed-size rounds under "
                "relation='replace_one_user' (dp_accounting's PLD accountant has no "
                "SampledWithoutReplacementDpEvent); use accountant='rdp', or the default "
                "add/remove relation (relation=None), which PLD supports"
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
            if rp.unit == "example":
                rdp = _example_rdp(rp, np.asarray(RDP_ORDERS, dtype=np.float64))
            elif rp.mechanism == "local_gaussian" or rp.relation == "replace_one_user":
                relation = (
                    _NeighborRel.REPLACE_ONE
                    if rp.relation == "replace_one_user"
                    else _NeighborRel.ADD_OR_REMOVE_ONE
                )
                acc = _rdp_lib.RdpAccountant(list(RDP_ORDERS), relation)
                acc.compose(rp.dp_event())
                rdp = np.asarray(acc.rdp, dtype=np.float64)
            else:
                rdp = _central_user_rdp(rp)
            self._rdp_cache[rp] = rdp
        return self._rdp_cache[rp]

    def _rdp_epsilon(self) -> float:
        total = np.zeros(len(RDP_ORDERS), dtype=np.float64)
        for rp, count in self._schedule:
            total += count * self._round_rdp(rp)
        if self._conversion == "classic":
            return classic_rdp_epsilon(RDP_ORDERS, total, self._delta)
        eps, _ = _rdp_lib.compute_epsilon(RDP_ORDERS, total, self._delta)
        return float(eps)

    def _entry_pld(
        self, rp: RoundPrivacy, count: int, side: str
    ) -> _pld_lib.PrivacyLossDistribution:
        key = (rp, side if rp.sampling == "fixed" or len(_pld_sides(rp)) > 1 else "remove")
        if key not in self._pld_base_cache:
            self._pld_base_cache[key] = _round_pld(rp, key[1])
        base = self._pld_base_cache[key]
        return base if count == 1 else base.self_compose(count)

    def _pld_epsilon(self) -> float:
        # Without a round whose two sides differ materially, the "remove" side dominates the
        # "add" side round by round (fixed size: rate m / N >= m / (N + 1)); else both count.
        both = any(len(_pld_sides(rp)) > 1 for rp, _ in self._schedule)
        return max(self._pld_side_epsilon(side) for side in (_SIDES if both else _SIDES[:1]))

    def _pld_side_epsilon(self, side: str) -> float:
        # Entries before the last are final (a later compose can only extend the last one), so
        # their composition is cached.
        prefix, length = self._pld_prefix[side]
        while length < len(self._schedule) - 1:
            rp, count = self._schedule[length]
            entry = self._entry_pld(rp, count, side)
            prefix = entry if prefix is None else prefix.compose(entry)
            length += 1
        self._pld_prefix[side] = (prefix, length)
        rp, count = self._schedule[-1]
        last = self._entry_pld(rp, count, side)
        total = last if prefix is None else prefix.compose(last)
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
    max_cohort_size: int | None = None,
    relation: str | None = None,
    upload_probability: float = 1.0,
) -> float:
    """The smallest noise multiplier whose epsilon at ``delta`` is at most ``target_epsilon``.

    The rounds are those of :class:`RoundPrivacy` with the given ``sampling``, ``num_clients``,
    ``sampling_rate``, ``cohort_size``, ``unit``, ``compositions``, ``mechanism``,
    ``max_cohort_size`` and ``relation``, accounted by
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
      max_cohort_size: the rounds' ``RoundPrivacy.max_cohort_size`` (Poisson cap; ``None``: none).
      relation: the rounds' ``RoundPrivacy.relation`` (``None``: the default relation).
      upload_probability: the rounds' ``RoundPrivacy.upload_probability`` (default ``1``).

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
        mechanism=mechanism,
        max_cohort_size=max_cohort_size,
        relation=relation,
        upload_probability=upload_probability,
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
    # Validates the combination (e.g. PLD with replace-one fixed-size rounds) before searching.
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
    and either Poisson sampling with rate ``M / N'`` (without a cap: the simulated sampler's
    ``max_cohort_size`` says nothing about the deployment's, which is assumed never to truncate)
    or a fixed cohort of ``M`` out of ``N'``.
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
            simulated,
            num_clients=n_big,
            sampling_rate=big_m / n_big,
            cohort_size=None,
            max_cohort_size=None,
        )
    else:
        deployment = dataclasses.replace(
            simulated, num_clients=n_big, sampling_rate=None, cohort_size=big_m
        )
    return sigma_sim, deployment
