"""fedjax_dp: fast, trustworthy simulation of federated learning with differential privacy.

A federated round is one pure function compiled once::

    sim = fedjax_dp.build_simulation(config, model, data)
    state = sim.init(jax.random.key(0))
    state, metrics = sim.round_fn(state, data, sim.make_hparams(), round_key)
"""

import sys as _sys

from fedjax_dp import data, models, privacy
from fedjax_dp.core import aggregators, distributed, sampling, systems
from fedjax_dp.core.algorithms import (
    ALGORITHMS,
    MECHANISMS,
    AlgorithmConfig,
    Simulation,
    build_simulation,
    check_hparams,
    resolve,
)
from fedjax_dp.core.base import (
    DPTransform,
    EmptyState,
    RoundTransform,
    chain,
    identity,
    sensitivity_value,
)
from fedjax_dp.core.client import ClientUpdate, build_client_update
from fedjax_dp.core.contexts import ClientContext, ClientResult, Cohort, RoundContext
from fedjax_dp.core.evaluation import evaluate
from fedjax_dp.core.round import Round, ServerState, build_round
from fedjax_dp.data import (
    FederatedData,
    from_arrays,
    load_digits,
    make_federated,
    partition,
    sources,
)
from fedjax_dp.data.sources import (
    DataNotFoundError,
    SyntheticData,
    fedprox_synthetic,
    from_folder,
    from_table,
    load_tfds,
)
from fedjax_dp.mechanisms.aggregation import (
    AdaptiveClipState,
    adaptive_clipping,
    add_gaussian_noise,
    add_laplace_noise,
    add_local_gaussian_noise,
    clip_per_client,
    clip_per_layer,
    value_noise_multiplier,
)
from fedjax_dp.models import Model, cross_entropy, from_flax, get_model, register_model
from fedjax_dp.privacy import accounting, audit
from fedjax_dp.privacy import membership as attacks
from fedjax_dp.runner import cli, experiment, population, sweep

# The modules' earlier public paths, for `import fedjax_dp.accounting` and the like.
for _name, _module in {
    "accounting": accounting,
    "experiment": experiment,
    "cli": cli,
    "audit": audit,
    "attacks": attacks,
    "sampling": sampling,
    "population": population,
    "sweep": sweep,
    "sources": sources,
    "systems": systems,
    "aggregators": aggregators,
    "distributed": distributed,
}.items():
    _sys.modules.setdefault(f"{__name__}.{_name}", _module)
del _name, _module

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "MECHANISMS",
    "AdaptiveClipState",
    "AlgorithmConfig",
    "ClientContext",
    "ClientResult",
    "ClientUpdate",
    "Cohort",
    "DPTransform",
    "DataNotFoundError",
    "EmptyState",
    "FederatedData",
    "Model",
    "Round",
    "RoundContext",
    "RoundTransform",
    "ServerState",
    "Simulation",
    "SyntheticData",
    "accounting",
    "adaptive_clipping",
    "add_gaussian_noise",
    "add_laplace_noise",
    "add_local_gaussian_noise",
    "aggregators",
    "attacks",
    "audit",
    "build_client_update",
    "build_round",
    "build_simulation",
    "chain",
    "check_hparams",
    "cli",
    "clip_per_client",
    "clip_per_layer",
    "cross_entropy",
    "data",
    "distributed",
    "evaluate",
    "experiment",
    "fedprox_synthetic",
    "from_arrays",
    "from_flax",
    "from_folder",
    "from_table",
    "get_model",
    "identity",
    "load_digits",
    "load_tfds",
    "make_federated",
    "models",
    "partition",
    "population",
    "privacy",
    "register_model",
    "resolve",
    "sampling",
    "sensitivity_value",
    "sources",
    "sweep",
    "systems",
    "value_noise_multiplier",
]
