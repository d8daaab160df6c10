"""fedjax_dp: fast, trustworthy simulation of federated learning with differential privacy.

A federated round is one pure function compiled once::

    sim = fedjax_dp.build_simulation(config, model, data)
    state = sim.init(jax.random.key(0))
    state, metrics = sim.round_fn(state, data, sim.make_hparams(), round_key)
"""

from fedjax_dp import accounting
from fedjax_dp._src import data, distributed, models, population, sampling
from fedjax_dp._src.aggregation import add_gaussian_noise, clip_per_client
from fedjax_dp._src.algorithms import (
    ALGORITHMS,
    AlgorithmConfig,
    Simulation,
    build_simulation,
    check_hparams,
    resolve,
)
from fedjax_dp._src.base import DPTransform, EmptyState, RoundTransform, chain, identity
from fedjax_dp._src.client import ClientUpdate, build_client_update
from fedjax_dp._src.data import FederatedData, from_arrays, load_digits, make_federated, partition
from fedjax_dp._src.evaluation import evaluate
from fedjax_dp._src.models import Model, cross_entropy, from_flax, get_model, register_model
from fedjax_dp._src.round import Round, ServerState, build_round

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "AlgorithmConfig",
    "ClientUpdate",
    "DPTransform",
    "EmptyState",
    "FederatedData",
    "Model",
    "Round",
    "RoundTransform",
    "ServerState",
    "Simulation",
    "accounting",
    "add_gaussian_noise",
    "build_client_update",
    "build_round",
    "build_simulation",
    "chain",
    "check_hparams",
    "clip_per_client",
    "cross_entropy",
    "data",
    "distributed",
    "evaluate",
    "from_arrays",
    "from_flax",
    "get_model",
    "identity",
    "load_digits",
    "make_federated",
    "models",
    "partition",
    "population",
    "register_model",
    "resolve",
    "sampling",
]
