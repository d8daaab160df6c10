"""One privacy plan: every release of every round, composed for runs, sweeps and audits.

A round releases one or more noised quantities (:class:`Release`): the noised sum of the
clipped model deltas, SCAFFOLD's noised control variates, adaptive clipping's noised count
(folded into the round's total noise multiplier), the example-level DP-SGD steps inside every
client. Each DP stage of the round declares its release (its
:class:`~fedjax_dp.DPTransform` fields: the unit it protects, the mechanism, the hparam holding
its noise multiplier); :meth:`fedjax_dp.Simulation.releases` lists them for given hparams.

:func:`round_privacy` turns the releases of one round into one
:class:`~fedjax_dp.accounting.RoundPrivacy` per accountant label (the unit of protection):

* Several central Gaussian releases over the same cohort are ONE sampled Gaussian mechanism on
  their concatenation. With L2 sensitivities ``C_j`` and noise stds ``sigma_j C_j``, whitening
  each block by its std gives a Gaussian with sensitivity ``sqrt(sum_j sigma_j^-2)`` in noise
  units: the noise multiplier ``(sum_j sigma_j^-2)^-1/2``. Accounting them as separately sampled
  mechanisms would not be valid (they share the sample), not composing them would under-report.
* A Laplace or local Gaussian release is accounted on its own; a round may not mix it with
  other user-level mechanisms (no analysis of the mixture is implemented: refused).
* Example-level releases (DP-SGD inside each client, ``E`` epochs) are their own label.

:class:`PrivacyPlan` holds what each round adds and accounts (noise schedules, calibration to a
target epsilon, the noise-cohort trick), composes rounds into one
:class:`~fedjax_dp.accounting.Accountant` per label, and gives the metrics-row entries (epsilon
and the neighbouring relation). :func:`build_plan` builds it from a config's ``privacy``
section; ``fedjax-dp run``, ``sweep`` and ``audit`` all use it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from fedjax_dp.privacy import accounting

#: What a DP run writes next to epsilon (logged at start-up; see docs/privacy.md).
RELEASED_IN_DP_RUNS = (
    "released: the model after each round and what is computed from it (test metrics on "
    "held-out data, update norm, an adaptive clip norm from the noised count), epsilon; "
    "not written: training loss, cohort sizes, overflow counts (the accountant does not "
    "cover them)"
)

# Which hparam holds the noise multiplier of each unit's (single) Gaussian mechanism: the one
# a noise schedule, calibration or the noise-cohort trick rescales.
NOISE_HPARAM = {"user": "noise_multiplier", "example": "example_noise_multiplier"}


@dataclasses.dataclass(frozen=True)
class Release:
    """One noised quantity that a round releases.

    Attributes:
      upload: the upload it noises (``"delta"``; SCAFFOLD's ``"control"``).
      unit: ``"user"`` or ``"example"``, what its neighbouring relation adds or removes.
      mechanism: ``"gaussian"``, ``"laplace"`` or ``"local_gaussian"``.
      noise_hparam: the hparam that holds its noise multiplier.
      noise_multiplier: that value (host float).
      compositions: how many times each protected unit passes through it per round (``1``
        at user level, the local epochs of example-level DP-SGD).
    """

    upload: str
    unit: str
    mechanism: str
    noise_hparam: str
    noise_multiplier: float
    compositions: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The public facts of a round's cohort that the accountant needs.

    Attributes:
      sampling: ``"poisson"`` or ``"fixed"``.
      num_clients: the population size.
      sampling_rate: Poisson's ``q``.
      cohort_size: fixed size's ``m``, Poisson's static cap ``K``.
      upload_probability: the probability that a kept client uploads (dropouts, dropped
        stragglers), independent of the data.
    """

    sampling: str
    num_clients: int
    sampling_rate: float | None
    cohort_size: int
    upload_probability: float = 1.0


def combined_gaussian(sigmas: Iterable[float]) -> float:
    """``(sum_j sigma_j^-2)^-1/2``: the noise multiplier of Gaussian releases over one sample
    (module docstring); ``0`` if any of them adds no noise."""
    sigmas = list(sigmas)
    if any(s == 0 for s in sigmas):
        return 0.0
    return math.fsum(s**-2 for s in sigmas) ** -0.5


def round_privacy(releases: Sequence[Release], sampling: Sampling) -> list[accounting.RoundPrivacy]:
    """One :class:`~fedjax_dp.accounting.RoundPrivacy` per unit for a round's releases.

    Central Gaussian user-level releases are combined (:func:`combined_gaussian`); a Poisson
    sampler's static cohort size is its cap ``K`` (accounted exactly), and user-level rounds
    credit the upload thinning where the cap does not bind
    (:attr:`~fedjax_dp.accounting.RoundPrivacy.upload_probability`); example-level rounds do
    not (a valid, looser bound). Releases without noise hparam value are skipped only when
    their stage adds no noise by construction; ``noise_multiplier = 0`` is a non-private
    release (epsilon = inf).

    Raises:
      ValueError: a round mixing user-level mechanisms, or with several example-level ones.
    """
    poisson = sampling.sampling == "poisson"
    common = dict(
        sampling=sampling.sampling,
        num_clients=sampling.num_clients,
        sampling_rate=sampling.sampling_rate if poisson else None,
        cohort_size=None if poisson else sampling.cohort_size,
        max_cohort_size=sampling.cohort_size if poisson else None,
    )
    thinning = dict(upload_probability=sampling.upload_probability) if poisson else {}
    user = [r for r in releases if r.unit == "user"]
    example = [r for r in releases if r.unit == "example"]
    out = []
    mechanisms = sorted({r.mechanism for r in user})
    if len(mechanisms) > 1 or (mechanisms and mechanisms[0] != "gaussian" and len(user) > 1):
        raise ValueError(
            f"a round with several user-level releases of mechanisms {mechanisms} "
            f"({', '.join(r.upload for r in user)}) cannot be accounted as one; use one "
            "mechanism (several Gaussian releases over one cohort are combined)"
        )
    if user:
        mechanism = mechanisms[0]
        out.append(
            accounting.RoundPrivacy(
                noise_multiplier=combined_gaussian(r.noise_multiplier for r in user),
                unit="user",
                compositions=1,
                mechanism=mechanism,
                **common,
                **(thinning if mechanism != "local_gaussian" else {}),
            )
        )
    if len(example) > 1:
        raise ValueError(
            f"a round with {len(example)} example-level releases cannot be accounted; use one"
        )
    for r in example:
        out.append(
            accounting.RoundPrivacy(
                noise_multiplier=r.noise_multiplier,
                unit="example",
                compositions=r.compositions,
                **common,
            )
        )
    return out


def relation_of(described: Mapping[str, Any]) -> str:
    """What the epsilons of ``described`` refer to, as one string.

    ``described`` maps accountant labels to objects with a ``neighboring_relation``
    (:class:`~fedjax_dp.accounting.Accountant` or
    :class:`~fedjax_dp.accounting.RoundPrivacy`): their relation when all share one (e.g.
    ``"add_or_remove_one_user"``), else ``"<label>: <relation>"`` pairs joined by ``"; "``.
    """
    relations = {label: d.neighboring_relation for label, d in described.items()}
    if len(set(relations.values())) == 1:
        return str(next(iter(relations.values())))
    return "; ".join(f"{label}: {relation}" for label, relation in relations.items())


def composed_epsilon(schedule, privacy) -> float:
    """Epsilon at ``privacy.delta`` of releasing everything in ``schedule`` together.

    Args:
      schedule: ``(RoundPrivacy, count)`` pairs of one unit and neighbouring relation: the
        rounds of several runs on the same data (a sweep's points, an audit's runs).
      privacy: the delta, accountant and conversion of the runs (a config's ``privacy``).

    Returns:
      The epsilon of one :class:`~fedjax_dp.accounting.Accountant` that composes every pair
      (a heterogeneous composition; pairs with the same ``RoundPrivacy`` are added up first,
      since composition does not depend on the order). ``inf`` if any round is non-private.
    """
    counts: dict[accounting.RoundPrivacy, int] = {}
    for rp, count in schedule:
        counts[rp] = counts.get(rp, 0) + int(count)
    acct = _accountant(privacy)
    for rp, count in counts.items():
        acct.compose(rp, count)
    return acct.epsilon()


def _accountant(privacy) -> accounting.Accountant:
    return accounting.Accountant(
        delta=privacy.delta, accountant=privacy.accountant, conversion=privacy.conversion
    )


def float32_at_least(x: float) -> float:
    """The smallest float32 value >= ``x``: the round computes in float32, and the noise it
    adds must never be below what is accounted."""
    f = np.float32(x)
    if float(f) < x:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


@dataclasses.dataclass
class PrivacyPlan:
    """What each round adds and what is accounted, decided before training (host side).

    Attributes:
      privacy: the config's ``privacy`` section (delta, accountant, conversion, ...).
      releases_at: ``round index -> releases`` of that round (what the round adds).
      round_privacy: ``round index -> {label: RoundPrivacy}`` to compose after that round;
        labels are the units (``"user"``/``"example"``), plus ``"user_simulated"`` with the
        noise-cohort trick. Metrics report ``epsilon_<label>``.
      hparams_at: ``round index -> hparams`` the round is called with (the noise multiplier
        changes with a schedule; the shapes and dtypes do not, so the round is traced once).
      row_at: ``round index -> extra metrics`` (the accounted noise multiplier).
      summary: facts for ``summary.json`` (e.g. the calibrated noise multiplier).
      accountants: label -> the run's accountant (composed by :meth:`compose`).
    """

    privacy: Any
    releases_at: Callable[[int], tuple[Release, ...]]
    round_privacy: Callable[[int], dict[str, accounting.RoundPrivacy]]
    hparams_at: Callable[[int], dict[str, Any]]
    row_at: Callable[[int], dict[str, Any]]
    summary: dict[str, Any]
    accountants: dict[str, accounting.Accountant] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.accountants:
            self.accountants = {label: _accountant(self.privacy) for label in self.labels}

    @property
    def labels(self) -> tuple[str, ...]:
        """The accountant labels (empty without DP)."""
        return tuple(self.round_privacy(0))

    @property
    def relation(self) -> str | None:
        """The neighbouring relation of the plan's epsilons (``None`` without DP)."""
        rps = self.round_privacy(0)
        return relation_of(rps) if rps else None

    def compose(self, r: int) -> dict[str, Any]:
        """Composes round ``r`` into :attr:`accountants`; returns its metrics-row entries:
        ``epsilon_<label>``, ``neighboring_relation_<label>``, ``delta``,
        ``neighboring_relation`` (DP runs) and :attr:`row_at`."""
        row: dict[str, Any] = {}
        for label, acct in self.accountants.items():
            acct.compose(self.round_privacy(r)[label], 1)
            row[f"epsilon_{label}"] = acct.epsilon()
            row[f"neighboring_relation_{label}"] = acct.neighboring_relation
        if self.accountants:
            row["delta"] = self.privacy.delta
            row["neighboring_relation"] = relation_of(self.accountants)
        row.update(self.row_at(r))
        return row

    def replay(self, rounds: int) -> None:
        """Composes rounds ``0 .. rounds - 1`` in order, as the run did (a resumed run's
        accountants are bit-identical to the ones it saved)."""
        for r in range(rounds):
            for label, acct in self.accountants.items():
                acct.compose(self.round_privacy(r)[label], 1)

    def schedule(self, rounds: int, count: int = 1) -> dict[str, list]:
        """``{label: [(RoundPrivacy, count), ...]}`` of ``rounds`` rounds released ``count``
        times (e.g. once per seed), for :func:`composed_epsilon`."""
        out: dict[str, list] = {label: [] for label in self.labels}
        for r in range(rounds):
            for label, rp in self.round_privacy(r).items():
                out[label].append((rp, count))
        return out

    def epsilons(self, rounds: int) -> dict[str, float]:
        """``{label: epsilon}`` after ``rounds`` rounds, in fresh accountants (the plan's own
        :attr:`accountants` are left as they are)."""
        return {
            label: composed_epsilon(schedule, self.privacy)
            for label, schedule in self.schedule(rounds).items()
        }

    def describe_releases(self) -> list[dict[str, Any]]:
        """The first round's releases as JSON-ready dicts (for ``summary.json``)."""
        return [r.to_dict() for r in self.releases_at(0)]


def build_plan(privacy, sim, hparams: Mapping[str, Any], rounds: int, log=print) -> PrivacyPlan:
    """Noise schedule, calibration and the noise-cohort trick of a config's ``privacy``.

    Without any of them every round adds and accounts the releases of ``hparams``
    (:meth:`fedjax_dp.Simulation.releases`). Otherwise the run must have exactly one Gaussian
    mechanism (user or example level), whose noise multiplier ``sigma_t`` for round ``t`` is
    ``sigma * profile_t``, with ``profile`` from :func:`fedjax_dp.accounting.noise_schedule`
    (``start=1``, ``end=noise_end_ratio``) and ``sigma`` the algorithm's noise multiplier or,
    with ``target_epsilon``, the one :func:`fedjax_dp.accounting.calibrate` finds for the
    accounted rounds. Each round adds the smallest float32 ``>=`` its value and that float32 is
    accounted. With the noise-cohort trick the deployment's rounds
    (:func:`fedjax_dp.accounting.noise_cohort`) are accounted with ``sigma_t``, the round adds
    ``sigma_t * m / M``, and the simulated run's own epsilon is reported alongside
    (``epsilon_user_simulated``).

    Args:
      privacy: the config's ``privacy`` section.
      sim: the run's :class:`fedjax_dp.Simulation`.
      hparams: the hparams the round is called with (device arrays or floats).
      rounds: the run's number of rounds.
      log: where the plan's decisions are printed before training.
    """
    from fedjax_dp.core.algorithms import check_hparams

    p = privacy
    host = {k: float(v) for k, v in hparams.items()}
    base_releases = tuple(sim.releases(host))
    base = sim.round_privacy(host)
    scheduled = p.noise_schedule != "constant"
    asked = [
        f"privacy.{name}"
        for name, on in (
            ("target_epsilon", p.target_epsilon > 0),
            ("noise_schedule", scheduled),
            ("noise_cohort_size", p.noise_cohort_size > 0),
        )
        if on
    ]
    if not asked:
        fixed = {rp.unit: rp for rp in base}
        return PrivacyPlan(
            p, lambda _: base_releases, lambda _: fixed, lambda _: hparams, lambda _: {}, {}
        )
    if len(base) != 1 or len(base_releases) != 1:
        raise ValueError(
            f"{', '.join(asked)} needs a run with exactly one DP mechanism (algorithm.name = "
            f"'dp_fedavg' or 'dp_sgd_fedavg'); this run has {len(base_releases)} releases"
        )
    (simulated,) = base
    (release,) = base_releases
    unit = simulated.unit
    key = NOISE_HPARAM.get(unit)
    if release.noise_hparam != key or host[key] != simulated.noise_multiplier:
        raise ValueError(f"{', '.join(asked)}: this run's {unit}-level mechanism is not supported")
    if p.noise_cohort_size:
        if "clipped_count_stddev" in hparams:
            raise ValueError(
                "privacy.noise_cohort_size is not supported with adaptive clipping (its "
                "clipped-count noise is not scaled to the deployment)"
            )
        try:
            # sigma_sim for noise multiplier 1 is the factor m / M.
            factor, accounted = accounting.noise_cohort(
                dataclasses.replace(simulated, noise_multiplier=1.0),
                noise_cohort_size=p.noise_cohort_size,
                population=p.noise_population or None,
            )
        except ValueError as e:
            raise ValueError(f"privacy.noise_cohort_size: {e}") from None
    else:
        factor, accounted = 1.0, simulated
    profile = accounting.noise_schedule(
        p.noise_schedule,
        start=1.0,
        end=p.noise_end_ratio if scheduled else None,
        rounds=rounds,
        stages=p.noise_schedule_stages or None,
    )
    summary: dict[str, Any] = {}
    if p.target_epsilon > 0:
        try:
            sigma = accounting.calibrate(
                p.target_epsilon,
                delta=p.delta,
                rounds=rounds,
                sampling=accounted.sampling,
                num_clients=accounted.num_clients,
                sampling_rate=accounted.sampling_rate if accounted.sampling == "poisson" else None,
                cohort_size=accounted.cohort_size,
                unit=unit,
                compositions=accounted.compositions,
                accountant=p.accountant,
                conversion=p.conversion,
                noise_profile=profile if scheduled else None,
                mechanism=accounted.mechanism,
                # The run's own rounds: its cap, relation and upload thinning.
                max_cohort_size=accounted.max_cohort_size,
                relation=accounted.relation,
                upload_probability=accounted.upload_probability,
            )
        except ValueError as e:
            raise ValueError(f"privacy.target_epsilon: {e}") from None
        summary["calibrated_noise_multiplier"] = sigma
        log(
            f"  calibrated {unit}-level noise multiplier {sigma:.4f}"
            + (" (first round)" if scheduled else "")
            + f" for epsilon <= {p.target_epsilon:g} at delta {p.delta:g} over {rounds} rounds "
            f"({p.accountant}); it replaces algorithm.{key} = {simulated.noise_multiplier:g}"
        )
    else:
        sigma = simulated.noise_multiplier
    # Per round: the noise multiplier accounted, and the float32 the round adds (>= its value).
    if p.noise_cohort_size:
        accounted_sigmas = [sigma * f for f in profile]
        added = [float32_at_least(s * factor) for s in accounted_sigmas]
    else:
        accounted_sigmas = added = [float32_at_least(sigma * f) for f in profile]
    by_value = {v: {**hparams, key: jnp.asarray(v, np.float32)} for v in set(added)}
    for hp in by_value.values():
        check_hparams(hp)
    rps: dict[tuple[float, float], dict[str, accounting.RoundPrivacy]] = {}

    def round_privacy_at(r: int) -> dict[str, accounting.RoundPrivacy]:
        k = (accounted_sigmas[r], added[r])
        if k not in rps:
            rps[k] = {unit: dataclasses.replace(accounted, noise_multiplier=k[0])}
            if p.noise_cohort_size:
                rps[k][f"{unit}_simulated"] = dataclasses.replace(simulated, noise_multiplier=k[1])
        return rps[k]

    def releases_at(r: int) -> tuple[Release, ...]:
        return (dataclasses.replace(release, noise_multiplier=added[r]),)

    if scheduled:
        log(
            f"  noise schedule: {p.noise_schedule}, {unit}-level noise multiplier "
            f"{accounted_sigmas[0]:.4g} -> {accounted_sigmas[-1]:.4g} in "
            f"{len(set(accounted_sigmas))} stages, accounted as a heterogeneous composition"
        )
    if p.noise_cohort_size:
        m = simulated.participation_probability * simulated.num_clients
        summary.update(
            noise_cohort_size=p.noise_cohort_size, noise_population=accounted.num_clients
        )
        log(
            f"  noise-cohort trick: noise scaled for a deployment with an expected cohort of "
            f"{p.noise_cohort_size} clients out of {accounted.num_clients} "
            f"(participation {accounted.participation_probability:.4g}), noise multiplier "
            f"{accounted_sigmas[0]:.4g}; this simulation (expected cohort {m:g} of "
            f"{simulated.num_clients}) adds noise multiplier {added[0]:.4g}, so the noise on "
            f"the mean update matches the deployment's.\n"
            f"  CAVEAT: epsilon_{unit} is the guarantee of that larger deployment, NOT of this "
            f"simulated run, which is protected only at its own, much weaker level "
            f"(epsilon_{unit}_simulated)."
        )
    return PrivacyPlan(
        p,
        releases_at,
        round_privacy_at,
        lambda r: by_value[added[r]],
        lambda r: {"noise_multiplier": accounted_sigmas[r]},
        summary,
    )
