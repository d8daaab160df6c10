"""Round v2 on 8 devices: per-client state and gathering aggregators equal one device."""

import jax
import numpy as np
from absl.testing import absltest, parameterized

import fedjax_dp
from tests import _testing


class ShardedStatefulRoundTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        if jax.device_count() < 8:
            self.skipTest("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")

    @parameterized.parameters(
        dict(sampling="fixed", dropout=0.0, cohort=13),
        dict(sampling="poisson", dropout=0.3, cohort=None),
    )
    def test_scaffold_client_states_equal_single_device(self, sampling, dropout, cohort):
        data = _testing.small_data(num_clients=24)
        model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(5,))
        kw = dict(
            name="scaffold",
            sampling=sampling,
            cohort_size=cohort,
            batch_size=3,
            client_lr=0.2,
            chunk_size=2,
            dropout_rate=dropout,
        )
        if sampling == "poisson":
            kw["sampling_rate"] = 0.4
        config = fedjax_dp.AlgorithmConfig(**kw)
        mesh = jax.make_mesh((8,), ("clients",))
        sims = [
            fedjax_dp.build_simulation(config, model, data),
            fedjax_dp.build_simulation(config, model, data, mesh=mesh),
        ]
        outs = []
        for sim in sims:
            state = sim.init(jax.random.key(0))
            for r in range(3):
                state, _ = sim.round_fn(
                    state, data.to_device(), sim.make_hparams(), jax.random.key(r)
                )
            outs.append(state)
        _testing.assert_trees_close(outs[0].params, outs[1].params, rtol=1e-5, atol=1e-6)
        _testing.assert_trees_close(
            outs[0].client_states, outs[1].client_states, rtol=1e-5, atol=1e-6
        )
        _testing.assert_trees_close(outs[0].server_aux, outs[1].server_aux, rtol=1e-5, atol=1e-6)
        written = np.abs(_testing.tree_flat(outs[1].client_states)).sum()
        self.assertGreater(written, 0)

    def test_coordinate_median_equals_single_device(self):
        data = _testing.small_data(num_clients=24)
        model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(5,))
        sim = fedjax_dp.build_simulation(
            fedjax_dp.AlgorithmConfig(cohort_size=13, batch_size=3, chunk_size=2), model, data
        )
        mesh = jax.make_mesh((8,), ("clients",))
        outs = []
        for m in (None, mesh):
            rnd = fedjax_dp.build_round(
                sim.client,
                sim.sampler,
                aggregator=fedjax_dp.aggregators.coordinate_median(),
                chunk_size=2,
                mesh=m,
            )
            state = rnd.init(sim.init(jax.random.key(0)).params)
            state, _ = rnd.round_fn(state, data.to_device(), sim.make_hparams(), jax.random.key(1))
            outs.append(state.params)
        _testing.assert_trees_close(outs[0], outs[1], rtol=1e-6, atol=1e-7)


if __name__ == "__main__":
    absltest.main()
