"""Privacy: what a run releases, how it is accounted, and how it is audited.

* :mod:`fedjax_dp.privacy.plan`: :class:`Release` (one noised quantity of a round),
  :class:`PrivacyPlan` (every release of every round, composed per unit of protection for runs,
  sweeps and audits) and :func:`build_plan` (noise schedules, calibration, the noise-cohort
  trick from a config's ``privacy`` section).
* :mod:`fedjax_dp.accounting`: the accountants (dp-accounting RDP and PLD, with the exact
  analyses of capped Poisson, fixed-size and Laplace rounds), calibration and noise schedules.
* :mod:`fedjax_dp.audit`: empirical lower bounds on epsilon from canary clients.
"""

from fedjax_dp.privacy.plan import (
    NOISE_HPARAM,
    RELEASED_IN_DP_RUNS,
    PrivacyPlan,
    Release,
    Sampling,
    build_plan,
    combined_gaussian,
    composed_epsilon,
    relation_of,
    round_privacy,
)

__all__ = [
    "NOISE_HPARAM",
    "RELEASED_IN_DP_RUNS",
    "PrivacyPlan",
    "Release",
    "Sampling",
    "build_plan",
    "combined_gaussian",
    "composed_epsilon",
    "relation_of",
    "round_privacy",
]
