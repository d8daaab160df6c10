"""The round's contracts, checked for every stage, aggregator and client-state spec.

Each entry of :data:`CASES` builds one simulation (a stage chain, an aggregator, an algorithm
with per-client state); every case must pass every invariant:

* unselected clients never contribute: poisoning the data of every client that is not a real
  member of the cohort (padding slots point at some client too) changes nothing, bit for bit;
* the chunk size changes nothing but summation order;
* ``jit`` equals running the round op by op (``jax.disable_jit``; one case per kind of
  contract, :data:`REPRESENTATIVE`);
* ``vmap`` over hparams equals one round per hparams value;
* a checkpoint round trip continues the run bit for bit.

Mesh invariance (the same rounds on 8 devices) is checked for the :data:`REPRESENTATIVE`
cases in ``tests/multidevice/contract_sharding_test.py``. A new stage, aggregator or client-state spec is added
to :data:`CASES` and inherits every check.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized

import fedjax_dp
from tests import _testing

# One worker runs this module (``--dist loadgroup``, see the Makefile): the tests of a case
# then share its compiled round (:func:`_build_cached`) instead of compiling it on each worker.
pytestmark = pytest.mark.xdist_group("contract")

_BASE = dict(cohort_size=6, batch_size=3, local_epochs=1, client_lr=0.3, chunk_size=6)

#: name -> (AlgorithmConfig overrides, aggregator factory or None, hparam to vmap over).
CASES = {
    "fedavg": (dict(name="fedavg"), None, "client_lr"),
    "fedavg_num_examples": (dict(name="fedavg", weighting="num_examples"), None, "server_lr"),
    "dp_fedavg_poisson": (
        dict(
            name="dp_fedavg", sampling="poisson", sampling_rate=0.3, cohort_size=None, clip_norm=0.5
        ),
        None,
        "noise_multiplier",
    ),
    "dp_fedavg_laplace": (
        dict(name="dp_fedavg", mechanism="laplace", clip_norm=0.5, noise_multiplier=0.5),
        None,
        "noise_multiplier",
    ),
    "local_dp": (
        dict(name="dp_fedavg", mechanism="local_gaussian", clip_norm=0.5, noise_multiplier=0.2),
        None,
        "clip_norm",
    ),
    "adaptive_clipping": (
        dict(name="dp_fedavg", adaptive_clipping=True, clip_norm=0.5, clipped_count_stddev=1.0),
        None,
        "target_quantile",
    ),
    "dp_sgd": (dict(name="dp_sgd_fedavg"), None, "example_noise_multiplier"),
    "fedprox_stragglers": (
        dict(name="fedprox", mu=0.5, local_epochs=2, straggler_fraction=0.5),
        None,
        "mu",
    ),
    "scaffold_dropout": (dict(name="scaffold", dropout_rate=0.3), None, "client_lr"),
    "scaffold_dp": (
        dict(name="scaffold", clip_norm=0.5, noise_multiplier=1.0, control_noise_multiplier=2.0),
        None,
        "control_noise_multiplier",
    ),
    "coordinate_median": (
        dict(name="fedavg"),
        fedjax_dp.aggregators.coordinate_median,
        "client_lr",
    ),
    "norm_bounded_mean": (
        dict(name="fedavg"),
        lambda: fedjax_dp.aggregators.norm_bounded_mean(0.05),
        "client_lr",
    ),
}


#: One case per kind of contract, for the slow checks (op by op, and the mesh): a stateless weighted sum,
#: stage state (adaptive clipping), per-client state with two noised uploads, systems
#: heterogeneity, a gathering and a two-pass aggregator. The other cases differ from these in
#: the noise or clip stage only.
REPRESENTATIVE = (
    "fedavg",
    "adaptive_clipping",
    "scaffold_dp",
    "fedprox_stragglers",
    "coordinate_median",
    "norm_bounded_mean",
)


def build(name, data, **overrides):
    """The case's simulation (cached per worker for the default data: the tests of one case
    share its compiled round)."""
    if data is _data():
        return _build_cached(name, tuple(sorted(overrides.items())))
    return _build(name, data, **overrides)


@functools.cache
def _data():
    return _testing.small_data(num_clients=14, seed=3)


@functools.cache
def _build_cached(name, overrides):
    return _build(name, _data(), **dict(overrides))


def _build(name, data, **overrides):
    config_kw, aggregator, _ = CASES[name]
    config = fedjax_dp.AlgorithmConfig(**{**_BASE, **config_kw, **overrides})
    model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(4,))
    return fedjax_dp.build_simulation(
        config, model, data, aggregator=None if aggregator is None else aggregator()
    )


def rounds(sim, data, hparams=None, state=None, keys=(1, 2)):
    """Runs a round per key (two rounds: per-client state is read back in the second)."""
    hp = sim.make_hparams() if hparams is None else hparams
    state = sim.init(jax.random.key(0)) if state is None else state
    dev = data.to_device()
    for k in keys:
        state, _ = sim.round_fn(state, dev, hp, jax.random.key(k))
    return state


def _exact(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _state_trees(state):
    return (state.params, state.client_states, state.server_aux)


class ContractTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.data = _data()

    @parameterized.named_parameters((n, n) for n in CASES)
    def test_unselected_clients_never_contribute(self, name):
        sim = build(name, self.data)
        key = jax.random.key(1)
        state = sim.init(jax.random.key(0))
        cohort, _ = sim.round.sample_step(key, state.round, state.sampler_state)
        real = set(np.asarray(cohort.ids)[np.asarray(cohort.mask)].tolist())
        self.assertLess(len(real), self.data.num_clients)  # there is someone to poison
        owner = np.repeat(np.arange(self.data.num_clients), np.asarray(self.data.counts))
        x = np.asarray(self.data.x).copy()
        x[~np.isin(owner, sorted(real))] = np.nan
        poisoned = dataclasses.replace(self.data, x=jnp.asarray(x))
        hp = sim.make_hparams()
        # The round donates its state: each call gets a fresh copy of the same state.
        clean, _ = sim.round_fn(sim.init(jax.random.key(0)), self.data.to_device(), hp, key)
        dirty, _ = sim.round_fn(sim.init(jax.random.key(0)), poisoned.to_device(), hp, key)
        _exact(_state_trees(clean), _state_trees(dirty))
        # The check can fail: changing one real member's data changes the round.
        member = np.asarray(self.data.x).copy()
        member[owner == min(real)] = 50.0
        changed = dataclasses.replace(self.data, x=jnp.asarray(member))
        moved, _ = sim.round_fn(sim.init(jax.random.key(0)), changed.to_device(), hp, key)
        self.assertFalse(
            all(
                np.array_equal(a, b)
                for a, b in zip(jax.tree.leaves(clean.params), jax.tree.leaves(moved.params))
            )
        )

    @parameterized.named_parameters((n, n) for n in CASES)
    def test_chunk_size_changes_only_summation_order(self, name):
        one = rounds(build(name, self.data, chunk_size=1), self.data)
        whole = rounds(build(name, self.data), self.data)
        _testing.assert_trees_close(_state_trees(one), _state_trees(whole), rtol=1e-5, atol=1e-6)

    @parameterized.named_parameters((n, n) for n in REPRESENTATIVE)
    def test_jit_equals_op_by_op(self, name):
        sim = build(name, self.data)
        jitted = rounds(sim, self.data, keys=(1,))
        with jax.disable_jit():
            plain = rounds(sim, self.data, keys=(1,))
        _testing.assert_trees_close(_state_trees(jitted), _state_trees(plain), rtol=1e-5, atol=1e-6)

    @parameterized.named_parameters((n, n) for n in CASES)
    def test_vmap_over_hparams_equals_one_round_each(self, name):
        sim = build(name, self.data)
        hparam = CASES[name][2]
        base = sim.make_hparams()
        values = [float(base[hparam]), float(base[hparam]) * 0.5 + 0.05]
        stacked = {k: jnp.stack([v, v]) for k, v in base.items()}
        stacked[hparam] = jnp.asarray(values, jnp.float32)
        dev = self.data.to_device()
        key = jax.random.key(1)
        batched, _ = jax.vmap(sim.round_fn, in_axes=(None, None, 0, None))(
            sim.init(jax.random.key(0)), dev, stacked, key
        )
        for i, v in enumerate(values):
            single, _ = sim.round_fn(
                sim.init(jax.random.key(0)), dev, sim.make_hparams(**{hparam: v}), key
            )
            _testing.assert_trees_close(
                jax.tree.map(lambda a, i=i: a[i], _state_trees(batched)),
                _state_trees(single),
                rtol=1e-5,
                atol=1e-6,
            )

    @parameterized.named_parameters((n, n) for n in CASES)
    def test_checkpoint_round_trip_continues_bit_for_bit(self, name):
        sim = build(name, self.data)
        state = rounds(sim, self.data, keys=(1,))
        restored = _testing.checkpoint_round_trip(sim, state)
        saved = jax.device_get(_state_trees(state))
        _exact(jax.device_get(_state_trees(restored)), saved)
        self.assertEqual(int(restored.round), int(state.round))
        _exact(
            _state_trees(rounds(sim, self.data, state=restored, keys=(2,))),
            _state_trees(rounds(sim, self.data, state=state, keys=(2,))),
        )


class SkippedSlotsTest(absltest.TestCase):
    def test_median_ignores_slots_of_skipped_chunks(self):
        # The round skips the chunks after the last real client (and a device holding only
        # padding runs none): their buffer rows are never written and must not count.
        agg = fedjax_dp.aggregators.coordinate_median()
        template = {"delta": jax.ShapeDtypeStruct((3,), jnp.float32)}
        acc = agg.init(template, 4)
        rows = jnp.asarray([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
        acc = agg.accumulate(acc, {"delta": rows}, jnp.asarray([True, True]), {}, 0)
        totals, _ = agg.finalize(acc, None, None)
        np.testing.assert_array_equal(totals["delta"], [2.0, 3.0, 4.0])


if __name__ == "__main__":
    absltest.main()
