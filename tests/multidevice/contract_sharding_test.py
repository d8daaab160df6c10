"""Mesh invariance of the round's contracts: one case per kind of contract of
tests/contract_test.py (``REPRESENTATIVE``: stage state, per-client state, systems, gathering
and two-pass aggregators) on 8 devices equals one device."""

import jax
from absl.testing import absltest, parameterized

import fedjax_dp
from tests import _testing, contract_test


class ContractMeshTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        if jax.device_count() < 8:
            self.skipTest("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")

    @parameterized.named_parameters((n, n) for n in contract_test.REPRESENTATIVE)
    def test_mesh_equals_one_device(self, name):
        data = _testing.small_data(num_clients=14, seed=3)
        single = contract_test.build(name, data, chunk_size=1)
        _, aggregator, _ = contract_test.CASES[name]
        sharded = fedjax_dp.build_simulation(
            single.config,
            single.model,
            data,
            mesh=jax.make_mesh((8,), ("clients",)),
            aggregator=None if aggregator is None else aggregator(),
        )
        a = contract_test.rounds(single, data)
        b = contract_test.rounds(sharded, data)
        _testing.assert_trees_close(
            contract_test._state_trees(a), contract_test._state_trees(b), rtol=1e-5, atol=1e-6
        )


if __name__ == "__main__":
    absltest.main()
