"""Your own stages in build_simulation: client stages before the DP clip, server stages after
the noise; and experiments/custom_stage.py (the README's new-algorithm example) runs."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import fedjax_dp
from tests import _testing

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "custom_stage.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("custom_stage", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scale(factor):
    def update(x, state, *, key, mask, hparams):
        return jax.tree.map(lambda v: v * factor, x), state

    return fedjax_dp.RoundTransform(lambda _: fedjax_dp.EmptyState(), update)


def _sim(data, clip_norm=0.1, **kw):
    config = fedjax_dp.AlgorithmConfig(
        name="dp_fedavg", sampling="fixed", cohort_size=data.num_clients, local_epochs=1,
        batch_size=4, client_lr=0.5, clip_norm=clip_norm, noise_multiplier=0.0,
    )  # fmt: skip
    model = fedjax_dp.get_model("logistic", data.feature_shape, data.num_classes)
    return fedjax_dp.build_simulation(config, model, data, **kw)


def _model_change(sim, data, noise=0.0):
    state = sim.init(jax.random.key(0))
    before = _testing.tree_flat(state.params)
    hparams = sim.make_hparams(noise_multiplier=noise)
    state, _ = sim.round_fn(state, data.to_device(), hparams, jax.random.key(1))
    return _testing.tree_flat(state.params) - before


class CustomStageTest(absltest.TestCase):
    def test_client_stage_runs_before_the_clip(self):
        data = _testing.small_data()
        plain = np.linalg.norm(_model_change(_sim(data, clip_norm=5.0), data))
        self.assertLess(plain, 1.0)  # no client reaches the clip norm 5
        scaled = _sim(data, clip_norm=5.0, client_stages=[_scale(1e3)])
        blown_up = np.linalg.norm(_model_change(scaled, data))
        # Mean of deltas clipped to 5: the clip bounds the change whatever the stage did.
        self.assertLessEqual(blown_up, 5.0 * (1 + 1e-5))
        self.assertGreater(blown_up, 2 * plain)  # the stage did act (deltas now hit the clip)

    def test_server_stage_runs_after_the_noise(self):
        data = _testing.small_data()
        noisy = _model_change(_sim(data), data, noise=1.0)
        self.assertGreater(np.abs(noisy).max(), 0.0)
        zeroed = _model_change(_sim(data, server_stages=[_scale(0.0)]), data, noise=1.0)
        np.testing.assert_array_equal(zeroed, 0.0)  # noise added before, then zeroed

    def test_dp_stage_is_refused(self):
        data = _testing.small_data()
        with self.assertRaisesRegex(TypeError, "DP stages come from the config"):
            _sim(data, server_stages=[fedjax_dp.add_gaussian_noise()])

    def test_top_k_keeps_k_largest_per_client(self):
        top_k = _load_example().top_k
        rng = np.random.default_rng(0)
        deltas = {
            "a": jnp.asarray(rng.normal(size=(3, 4, 5))),
            "b": jnp.asarray(rng.normal(size=(3, 5))),
        }
        out, _ = top_k(0.2).update(deltas, (), key=None, mask=None, hparams={})
        flat_in = np.concatenate([np.asarray(v).reshape(3, -1) for v in deltas.values()], 1)
        flat_out = np.concatenate([np.asarray(v).reshape(3, -1) for v in out.values()], 1)
        for c in range(3):
            kept = np.flatnonzero(flat_out[c])
            np.testing.assert_array_equal(
                np.sort(kept), np.sort(np.argsort(-np.abs(flat_in[c]))[:5])
            )
            np.testing.assert_array_equal(flat_out[c, kept], flat_in[c, kept])

    def test_example_runs_and_accounts_like_plain_dp_fedavg(self):
        accuracy, epsilon = _load_example().main(rounds=20)
        self.assertGreater(accuracy, 0.5)  # 10 classes: chance is 0.1
        privacy = _testing.poisson_run_privacy(1.0, 300, 0.1)  # at the run's cohort cap
        expected = fedjax_dp.accounting.epsilon(privacy, rounds=20, delta=1e-4)
        self.assertAlmostEqual(epsilon, expected, places=6)


if __name__ == "__main__":
    absltest.main()
