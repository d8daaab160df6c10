"""Host-placed per-client state: a stateful algorithm whose state lives on the host gives
the same rounds, bit for bit, as the same algorithm with the state on the device."""

from __future__ import annotations

import jax
import numpy as np
from absl.testing import absltest

import fedjax_dp
from fedjax_dp.runner.host_states import HostClientStates
from fedjax_dp.runner.population import HostPopulation, run_rounds
from tests import _testing


def _sims():
    data = _testing.small_data(num_clients=12, seed=5)
    model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(4,))
    config = fedjax_dp.AlgorithmConfig(
        name="scaffold", cohort_size=5, batch_size=3, client_lr=0.3, dropout_rate=0.3
    )
    device = fedjax_dp.build_simulation(config, model, data)
    host = fedjax_dp.build_simulation(config, model, data, host_client_states=True)
    return data, device, host


class HostClientStatesTest(absltest.TestCase):
    def test_same_rounds_as_device_state(self):
        data, device, host = _sims()
        population = HostPopulation.from_federated_data(data)
        hp = device.make_hparams()
        d_state = device.init(jax.random.key(0))
        h_state = host.init(jax.random.key(0))
        self.assertEqual(jax.tree.leaves(h_state.client_states)[0].shape[0], 5)  # cohort rows
        states = HostClientStates(h_state, data.num_clients)
        for r in range(4):
            key = jax.random.key(10 + r)
            d_state, d_metrics = device.round_fn(d_state, data, hp, key)
            cohort = host.round.sample(key)
            cohort_data = population.gather(cohort.ids, cohort.mask)
            h_state, h_metrics = states.round(host.round_fn, h_state, cohort_data, hp, key, cohort)
            np.testing.assert_array_equal(d_metrics["train_loss"], h_metrics["train_loss"])
        for a, b in zip(jax.tree.leaves(d_state.params), jax.tree.leaves(h_state.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        d_rows = jax.device_get(d_state.client_states)
        for a, b in zip(jax.tree.leaves(d_rows), jax.tree.leaves(states.states)):
            np.testing.assert_array_equal(a, b)  # every client's control variate
        written = np.any(np.abs(jax.tree.leaves(states.states)[0]) > 0, axis=-1)
        self.assertGreater(written.sum(), 0)  # the test saw real state, not only zeros

    def test_run_rounds_with_host_states_equals_device_state(self):
        data, device, host = _sims()
        population = HostPopulation.from_federated_data(data)
        hp = device.make_hparams()
        keys = [jax.random.key(20 + r) for r in range(3)]
        d_state = device.init(jax.random.key(0))
        for k in keys:
            d_state, _ = device.round_fn(d_state, data, hp, k)
        h_state = host.init(jax.random.key(0))
        with self.assertRaisesRegex(ValueError, "pass client_states="):
            run_rounds(host, h_state, population, hp, keys)
        states = HostClientStates(h_state, data.num_clients)
        h_state, _ = run_rounds(host, h_state, population, hp, keys, client_states=states)
        for a, b in zip(
            jax.tree.leaves(jax.device_get(d_state.client_states)), jax.tree.leaves(states.states)
        ):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(jax.tree.leaves(d_state.params), jax.tree.leaves(h_state.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def test_errors_name_the_fix(self):
        data, _, host = _sims()
        state = host.init(jax.random.key(0))
        with self.assertRaisesRegex(ValueError, "host_client_states: .*pass the cohort"):
            host.round_fn(state, data, host.make_hparams(), jax.random.key(1))
        states = HostClientStates(host.init(jax.random.key(0)), data.num_clients)
        rows = states.gather(np.array([1, 1]))
        with self.assertRaisesRegex(ValueError, "distinct"):
            states.scatter(np.array([1, 1]), np.array([True, True]), rows)


if __name__ == "__main__":
    absltest.main()
