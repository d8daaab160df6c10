"""DP mechanisms: adaptive clipping, per-layer clipping, Laplace, local DP.

Each mechanism's noise is tested statistically (the right scale accepted, one 10% off
rejected), its round against a plain-loop reference with the same keys, its sensitivity and
its accounting against closed forms.
"""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from scipy import stats

import fedjax_dp
from fedjax_dp import accounting, experiment
from fedjax_dp.core import algorithms, base, sampling
from fedjax_dp.mechanisms import aggregation
from fedjax_dp.mechanisms import noise as noise_lib
from tests import _testing

_BASE = dict(
    name="dp_fedavg", cohort_size=5, batch_size=3, local_epochs=2, client_lr=0.3, chunk_size=2
)
_CLIENT_FN = {}  # one jitted client update for every simulation of _BASE (same model/schedule)


def _sim(data, **kw):
    model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(5,))
    return fedjax_dp.build_simulation(fedjax_dp.AlgorithmConfig(**{**_BASE, **kw}), model, data)


def _f64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _l2(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in tree.values())))


def _scaled(tree, s):
    return jax.tree.map(lambda x: x * s, tree)


def loop_round(sim, state, data, hparams, key):
    """One round of ``sim`` as a Python loop over the sampled clients, float64 sums.

    Keys follow the documented scheme: round key -> purpose -> client id -> (update 0,
    stages 1) -> stage index; the server's stage 0 key is fold_in(fold_in(key, 2), 0).
    Returns ``(new params, clip norm used, next clip norm)`` (clip norms: adaptive only).
    """
    cfg = sim.config
    if "update" not in _CLIENT_FN:
        _CLIENT_FN["update"] = jax.jit(sim.client.simple)
    update = _CLIENT_FN["update"]
    ids, mask, _ = sim.sampler.sample(jax.random.fold_in(key, _testing.SAMPLE))
    clients_key = jax.random.fold_in(key, _testing.CLIENTS)
    server_key = jax.random.fold_in(jax.random.fold_in(key, _testing.SERVER), 0)
    hp = {k: float(v) for k, v in hparams.items()}
    clip_used = None
    if cfg.adaptive_clipping:
        clip_used = float(state.server_tx_state["delta"][0].clip_norm)
        hp["clip_norm"] = clip_used
    groups = algorithms.parse_layer_clip_norms(cfg.layer_clip_norms or "x=1")
    total = _f64(jax.tree.map(jnp.zeros_like, state.params))
    below = 0.0
    for cid, m in zip(np.asarray(ids), np.asarray(mask)):
        if not m:
            continue
        ckey = jax.random.fold_in(clients_key, int(cid))
        client_hp = {"client_lr": hparams["client_lr"]}  # all the client update reads
        d, _ = update(state.params, data, jnp.int32(cid), jax.random.fold_in(ckey, 0), client_hp)
        d = _f64(d)
        if cfg.layer_clip_norms:  # groups: the top-level layers of the MLP, in order
            for pattern, _ in groups:
                c = hp[aggregation.layer_clip_hparam(pattern)]
                d[pattern] = _scaled(d[pattern], min(1.0, c / max(_l2(d[pattern]), 1e-30)))
        elif cfg.mechanism == "laplace":
            l1 = sum(np.abs(x).sum() for x in jax.tree.leaves(d))
            d = _scaled(d, min(1.0, hp["clip_norm"] / max(l1, 1e-30)))
        else:
            norm = float(np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(d))))
            below += float(norm <= hp.get("clip_norm", np.inf)) - 0.5
            d = _scaled(d, min(1.0, hp["clip_norm"] / max(norm, 1e-30)))
        if cfg.mechanism == "local_gaussian":
            stage_key = jax.random.fold_in(jax.random.fold_in(ckey, 1), 1)  # stage 1: noise
            sens = fedjax_dp.sensitivity_value(sim.round.client_stages[1].sensitivity, hp)
            noise = base.gaussian_like(stage_key, state.params, hp["noise_multiplier"] * sens)
            d = jax.tree.map(lambda x, n: x + np.asarray(n, np.float64), d, noise)
        total = jax.tree.map(np.add, total, d)
    next_clip = None
    if cfg.mechanism == "laplace":
        leaves, treedef = jax.tree.flatten(total)
        keys = jax.random.split(server_key, len(leaves))
        scale = hp["noise_multiplier"] * hp["clip_norm"]
        noise = [
            scale * np.asarray(noise_lib.laplace(k, x.shape), np.float64)
            for k, x in zip(keys, leaves)
        ]
        total = jax.tree.unflatten(treedef, [t + n for t, n in zip(leaves, noise)])
    elif cfg.adaptive_clipping:
        value_key, count_key = jax.random.split(server_key)
        z_delta = fedjax_dp.value_noise_multiplier(
            hp["noise_multiplier"], hp["clipped_count_stddev"]
        )
        noise = base.gaussian_like(value_key, state.params, jnp.float32(z_delta * clip_used))
        total = jax.tree.map(lambda t, n: t + np.asarray(n, np.float64), total, noise)
        count = hp["clipped_count_stddev"] * float(noise_lib.gaussian(count_key, ()))
        frac = (below + count) / sim.sampler.expected_cohort_size + 0.5
        next_clip = clip_used * math.exp(-hp["clip_lr"] * (frac - hp["target_quantile"]))
    elif cfg.mechanism == "gaussian":
        sens = fedjax_dp.sensitivity_value(sim.round.server_stages[0].sensitivity, hp)
        std = jnp.float32(hp["noise_multiplier"] * float(sens))
        noise = base.gaussian_like(server_key, state.params, std)
        total = jax.tree.map(lambda t, n: t + np.asarray(n, np.float64), total, noise)
    params = jax.tree.map(
        lambda p, t: (
            np.asarray(p, np.float64) + hp["server_lr"] * t / sim.sampler.expected_cohort_size
        ),
        state.params,
        total,
    )
    return params, clip_used, next_clip


def _ks(samples, dist):
    return stats.kstest(np.ravel(samples), dist.cdf).pvalue


class NoiseDistributionTest(parameterized.TestCase):
    """Each mechanism's noise has its stated scale: accept it, reject one 10% off."""

    def _check_scale(self, samples, make_dist, scale, wrong=()):
        self.assertGreater(_ks(samples, make_dist(scale)), 1e-3)
        for s in (scale * 0.9, scale * 1.1, *wrong):
            self.assertLess(_ks(samples, make_dist(s)), 1e-6, msg=f"scale {s} vs true {scale}")

    def test_laplace_noise_scale_is_sigma_times_l1_clip(self):
        stage = fedjax_dp.add_laplace_noise()
        total = {"a": jnp.zeros((150_000,)), "b": jnp.zeros((3,))}
        hp = {"clip_norm": jnp.float32(0.5), "noise_multiplier": jnp.float32(1.5)}
        out, _ = jax.jit(stage.update)(total, stage.init(None), key=jax.random.key(0), hparams=hp)
        self._check_scale(out["a"], lambda b: stats.laplace(scale=b), 0.75)
        self.assertFalse(np.allclose(out["a"][:3], out["b"]))  # one key per leaf
        self.assertEqual((stage.norm, stage.mechanism), ("l1", "laplace"))

    def test_local_noise_per_client_with_its_own_key(self):
        stage = fedjax_dp.add_local_gaussian_noise()
        deltas = {"w": jnp.zeros((4, 40_000))}
        mask = jnp.array([True, True, False, True])
        keys = jax.random.split(jax.random.key(1), 4)
        hp = {"clip_norm": jnp.float32(0.4), "noise_multiplier": jnp.float32(2.0)}
        out, _ = jax.jit(stage.update)(deltas, stage.init(None), key=keys, mask=mask, hparams=hp)
        w = np.asarray(out["w"])
        np.testing.assert_array_equal(w[2], 0.0)  # masked: exactly zero
        self.assertGreater(np.abs(w[0] - w[1]).min(), 0.0)  # clients' noises differ
        self._check_scale(w[[0, 1, 3]], lambda s: stats.norm(scale=s), 0.8)

    def test_per_layer_noise_uses_the_combined_sensitivity(self):
        names = ("clip_norm[a]", "clip_norm[b]")
        stage = fedjax_dp.add_gaussian_noise(names)
        hp = {names[0]: jnp.float32(0.3), names[1]: jnp.float32(0.4), "noise_multiplier": 2.0}
        total = {"a": jnp.zeros((60_000,)), "b": jnp.zeros((60_000,))}
        out, _ = jax.jit(stage.update)(total, stage.init(None), key=jax.random.key(2), hparams=hp)
        flat = np.concatenate([out["a"], out["b"]])
        # std = sigma * sqrt(0.3^2 + 0.4^2) = 2 * 0.5; not sigma * max(C_g) = 0.8
        self._check_scale(flat, lambda s: stats.norm(scale=s), 1.0, wrong=(0.8,))

    def _adaptive(self, m=10.0, c0=0.5):
        _, server = fedjax_dp.adaptive_clipping(c0, m)
        return server

    def _adaptive_hp(self, z, sigma_b, stat=0.0):
        return {
            "noise_multiplier": jnp.float32(z),
            "clipped_count_stddev": jnp.float32(sigma_b),
            "target_quantile": jnp.float32(0.5),
            "clip_lr": jnp.float32(0.2),
            "clip_norm:unclipped": jnp.float32(stat),
        }

    def test_adaptive_value_noise_uses_the_split_multiplier(self):
        server = self._adaptive(c0=0.5)
        z, sigma_b = 1.0, 0.75
        z_delta = fedjax_dp.value_noise_multiplier(z, sigma_b)
        self.assertAlmostEqual(z_delta, (1.0 - 1.0 / 2.25) ** -0.5, places=12)
        total = {"w": jnp.zeros((100_000,))}
        out, _ = jax.jit(server.update)(
            total, server.init(None), key=jax.random.key(3), hparams=self._adaptive_hp(z, sigma_b)
        )
        # z_delta * C (about 1.34 * 0.5), not z * C, the un-split multiplier.
        self._check_scale(out["w"], lambda s: stats.norm(scale=s), z_delta * 0.5, wrong=(z * 0.5,))

    def test_adaptive_count_noise_std(self):
        """From C_{t+1} = C_t exp(-eta (b_bar - gamma)): b_bar - (s/m + 1/2) ~ N(0, (sigma_b/m)^2)."""
        m, c0, sigma_b, s = 10.0, 0.5, 0.5, 2.0
        server = self._adaptive(m=m, c0=c0)
        hp = self._adaptive_hp(0.5, sigma_b, stat=s)

        def new_clip(key):
            _, st = server.update({"w": jnp.zeros((1,))}, server.init(None), key=key, hparams=hp)
            return st.clip_norm

        clips = jax.jit(jax.vmap(new_clip))(jax.random.split(jax.random.key(4), 40_000))
        frac = 0.5 - np.log(np.asarray(clips, np.float64) / c0) / 0.2
        self._check_scale(frac - (s / m + 0.5), lambda x: stats.norm(scale=x), sigma_b / m)


class AdaptiveClippingTest(parameterized.TestCase):
    def test_clip_norm_converges_to_the_target_quantile(self):
        """Synthetic clients whose updates have known norms: C_t approaches their quantile."""
        num_clients, cohort, dim = 400, 50, 3
        norms = np.exp(np.random.default_rng(0).normal(0.0, 0.5, num_clients)).astype(np.float32)
        direction = jnp.ones((dim,)) / math.sqrt(dim)

        def update(params, data, ctx, hparams):
            del params, hparams
            metrics = {k: jnp.ones(()) for k in ("loss_sum", "num_seen", "num_examples")}
            return fedjax_dp.ClientResult({"delta": data[ctx.row] * direction}, (), metrics)

        client = fedjax_dp.ClientUpdate(update, 1, 1, 1, False)
        clip, noise = fedjax_dp.adaptive_clipping(0.1, cohort)
        rnd = fedjax_dp.build_round(
            client,
            sampling.fixed_size(num_clients, cohort),
            client_stages=[clip],
            server_stages=[noise],
            denominator="expected",
            chunk_size=16,
        )
        data = jnp.asarray(norms)
        for gamma in (0.5, 0.8):
            hp = {
                "server_lr": jnp.float32(0.0),
                "noise_multiplier": jnp.float32(1.0),
                "clipped_count_stddev": jnp.float32(0.05 * cohort),
                "target_quantile": jnp.float32(gamma),
                "clip_lr": jnp.float32(0.2),
            }
            state = rnd.init(jnp.zeros((dim,)))
            history = []
            for r in range(150):
                state, metrics = rnd.round_fn(state, data, hp, jax.random.key(r))
                history.append(metrics["clip_norm"])
            history = np.asarray(history)
            self.assertAlmostEqual(float(history[0]), 0.1, places=6)  # round 1 used C_0
            want = float(np.quantile(norms, gamma))
            got = float(np.median(history[-50:]))
            self.assertLess(abs(got / want - 1.0), 0.1, msg=f"gamma={gamma}: C={got}, want {want}")
            self.assertAlmostEqual(float(np.mean(norms <= got)), gamma, delta=0.06)

    def test_round_equals_python_loop(self):
        """Poisson: the realised cohort differs from the expected one (the centred count).

        (Fixed-size sampling runs through the same code; the convergence test uses it.)
        """
        data = _testing.small_data()
        sim = _sim(
            data,
            adaptive_clipping=True,
            clip_norm=0.8,
            noise_multiplier=0.3,
            server_lr=0.7,
            sampling="poisson",
            sampling_rate=0.4,
            cohort_size=None,
        )
        self.assertAlmostEqual(
            sim.config.clipped_count_stddev, 0.05 * sim.sampler.expected_cohort_size
        )
        dev, hp = data.to_device(), sim.make_hparams()
        self.assertNotIn("clip_norm", hp)  # the clip norm is state, not an hparam
        state = sim.init(jax.random.key(0))
        for r in range(2):
            key = jax.random.key(10 + r)
            want, clip_used, next_clip = loop_round(sim, state, dev, hp, key)
            state, metrics = sim.round_fn(state, dev, hp, key)
            _testing.assert_trees_close(state.params, want, rtol=2e-4, atol=2e-6)
            np.testing.assert_allclose(float(metrics["clip_norm"]), clip_used, rtol=1e-6)
            np.testing.assert_allclose(
                float(state.server_tx_state["delta"][0].clip_norm), next_clip, rtol=1e-5
            )
            self.assertNotAlmostEqual(next_clip, clip_used, places=4)

    def test_accounted_with_the_total_noise_multiplier(self):
        data = _testing.small_data()
        sim = _sim(data, adaptive_clipping=True, noise_multiplier=0.4)
        (rp,) = sim.round_privacy(sim.make_hparams())
        self.assertEqual((rp.mechanism, rp.unit), ("gaussian", "user"))
        self.assertAlmostEqual(rp.noise_multiplier, 0.4, places=6)  # z, not z_delta > z
        self.assertEqual(
            (sim.config.clip_norm, sim.config.target_quantile, sim.config.clip_lr), (0.1, 0.5, 0.2)
        )

    def test_clip_norm_in_hparams_is_refused(self):
        data = _testing.small_data()
        sim = _sim(data, adaptive_clipping=True, noise_multiplier=0.3)
        hp = dict(sim.make_hparams(), clip_norm=jnp.float32(1.0))
        with self.assertRaisesRegex(ValueError, "set by the round's state"):
            sim.round_fn(sim.init(jax.random.key(0)), data.to_device(), hp, jax.random.key(1))
        with self.assertRaisesRegex(ValueError, "unknown hparams"):
            sim.make_hparams(clip_norm=1.0)


class PerLayerClippingTest(parameterized.TestCase):
    def test_each_group_is_bounded_separately(self):
        names = {"Dense_0": "clip_norm[Dense_0]", "Dense_1": "clip_norm[Dense_1]"}
        stage = fedjax_dp.clip_per_layer(names)
        rng = np.random.default_rng(0)
        deltas = {
            "Dense_0": {"kernel": rng.normal(size=(6, 4, 3)), "bias": rng.normal(size=(6, 3))},
            "Dense_1": {
                "kernel": 0.01 * rng.normal(size=(6, 3, 2)),
                "bias": rng.normal(size=(6, 2)),
            },
            "Dense_10": {"kernel": rng.normal(size=(6, 2))},  # 'Dense_1' must not take it
        }
        deltas = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), deltas)
        hp = {"clip_norm[Dense_0]": jnp.float32(0.5), "clip_norm[Dense_1]": jnp.float32(0.7)}
        mask = jnp.array([True] * 5 + [False])
        with self.assertRaisesRegex(ValueError, "'Dense_10/kernel' matches no clip group"):
            stage.update(deltas, stage.init(None), mask=mask, hparams=hp)
        stage = fedjax_dp.clip_per_layer([*names.items(), ("Dense_1.*", "clip_norm[rest]")])
        hp["clip_norm[rest]"] = jnp.float32(100.0)
        out, _ = jax.jit(stage.update)(deltas, stage.init(None), mask=mask, hparams=hp)
        eps = 4 * float(jnp.finfo(jnp.float32).eps)
        for c in range(5):
            for group, bound in (("Dense_0", 0.5), ("Dense_1", 0.7), ("Dense_10", 100.0)):
                row = jax.tree.map(lambda x, c=c: x[c], out[group])
                before = _l2(jax.tree.map(lambda x, c=c: x[c], deltas[group]))
                self.assertLessEqual(_l2(row), bound * (1 + eps))
                np.testing.assert_allclose(_l2(row), min(before, bound), rtol=1e-5)
        for leaf in jax.tree.leaves(out):
            np.testing.assert_array_equal(np.asarray(leaf[5]), 0.0)
        self.assertEqual(
            stage.sensitivity, ("clip_norm[Dense_0]", "clip_norm[Dense_1]", "clip_norm[rest]")
        )

    def test_sensitivity_values(self):
        hp = {"a": 0.3, "b": 0.4, "c": 1.2}
        self.assertAlmostEqual(
            float(fedjax_dp.sensitivity_value(("a", "b", "c"), hp)), 1.3, places=6
        )
        self.assertAlmostEqual(float(fedjax_dp.sensitivity_value("c", hp)), 1.2, places=6)
        self.assertAlmostEqual(
            float(fedjax_dp.sensitivity_value(("a", "b"), hp, "l1")), 0.7, places=6
        )

    def test_round_equals_python_loop(self):
        data = _testing.small_data()
        sim = _sim(data, layer_clip_norms="Dense_0=0.4, Dense_1=0.6", noise_multiplier=0.7)
        self.assertEqual(
            sim.round.server_stages[0].sensitivity, ("clip_norm[Dense_0]", "clip_norm[Dense_1]")
        )
        dev, hp, key = data.to_device(), sim.make_hparams(), jax.random.key(5)
        state = sim.init(jax.random.key(0))
        want, _, _ = loop_round(sim, state, dev, hp, key)
        got, _ = sim.round_fn(state, dev, hp, key)
        _testing.assert_trees_close(got.params, want, rtol=2e-4, atol=2e-6)
        (rp,) = sim.round_privacy(hp)
        self.assertEqual(rp.mechanism, "gaussian")
        self.assertAlmostEqual(rp.noise_multiplier, 0.7, places=6)


class LaplaceTest(parameterized.TestCase):
    def test_l1_clip_bounds_the_l1_norm(self):
        stage = fedjax_dp.clip_per_client(norm="l1")
        x = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 50)), jnp.float32)}
        x["w"] = x["w"].at[3].multiply(0.001)  # under the bound: unchanged
        out, _ = stage.update(
            x, stage.init(None), mask=jnp.ones(4, bool), hparams={"clip_norm": 2.0}
        )
        l1 = np.abs(np.asarray(out["w"])).sum(axis=1)
        np.testing.assert_allclose(l1[:3], 2.0, rtol=1e-5)
        np.testing.assert_allclose(out["w"][3], x["w"][3], rtol=1e-6)

    def test_round_equals_python_loop(self):
        data = _testing.small_data()
        sim = _sim(data, mechanism="laplace", clip_norm=3.5, noise_multiplier=0.5)
        dev, hp, key = data.to_device(), sim.make_hparams(), jax.random.key(6)
        state = sim.init(jax.random.key(0))
        want, _, _ = loop_round(sim, state, dev, hp, key)
        got, _ = sim.round_fn(state, dev, hp, key)
        _testing.assert_trees_close(got.params, want, rtol=2e-4, atol=2e-6)
        (rp,) = sim.round_privacy(hp)
        self.assertEqual(rp.mechanism, "laplace")

    @parameterized.product(accountant=("rdp", "pld"), rounds=(1, 3, 200))
    def test_epsilon_against_pure_composition(self, accountant, rounds):
        sigma, delta = 2.0, 1e-5  # eps_round = C / b = 1 / sigma
        rp = accounting.RoundPrivacy(
            sigma, "poisson", num_clients=100, sampling_rate=1.0, mechanism="laplace"
        )
        self.assertEqual(rp.pure_epsilon, 0.5)
        eps = accounting.epsilon(rp, rounds=rounds, delta=delta, accountant=accountant)
        self.assertLessEqual(eps, rounds * 0.5 + 1e-12)  # pure DP composes additively
        if rounds == 1 and accountant == "pld":  # Laplace: delta(eps) = 1 - exp((eps - eps0)/2)
            self.assertAlmostEqual(eps, 0.5 + 2 * math.log1p(-delta), delta=2e-3)
        if rounds <= 3:
            self.assertGreater(eps, rounds * 0.5 - 0.01)  # small T: basic composition is tight
        else:  # many rounds: (eps, delta) composition beats T * eps0, but stays above the
            # mean privacy loss T * KL = T (eps0 + exp(-eps0) - 1) (about 21 here; eps is ~47-50)
            self.assertLess(eps, rounds * 0.5)
            self.assertGreater(eps, 1.5 * rounds * (0.5 + math.exp(-0.5) - 1))
            # ... and is exactly dp_accounting's value for T Laplace(b = sigma C) rounds.
            self.assertAlmostEqual(
                eps,
                _dp_accounting_epsilon(
                    dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.LaplaceDpEvent(sigma))
                    if accountant == "pld"
                    else dp_accounting.LaplaceDpEvent(sigma),
                    rounds,
                    delta,
                    accountant,
                ),
                places=6,
            )

    def test_epsilon_with_sampling(self):
        q, sigma = 0.1, 1.0
        rp = accounting.RoundPrivacy(
            sigma, "poisson", num_clients=1000, sampling_rate=q, mechanism="laplace"
        )
        amplified = math.log1p(q * math.expm1(1.0))
        self.assertAlmostEqual(rp.pure_epsilon, amplified)
        # RDP: the certified subsampled-Laplace RDP, never above pure composition.
        eps_rdp = accounting.epsilon(rp, rounds=5, delta=1e-6, accountant="rdp")
        self.assertLessEqual(eps_rdp, 5 * amplified + 1e-12)
        # PLD: dp_accounting's Poisson-sampled Laplace, tighter still.
        eps_pld = accounting.epsilon(rp, rounds=5, delta=1e-6, accountant="pld")
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.LaplaceDpEvent(sigma))
        self.assertAlmostEqual(eps_pld, _dp_accounting_epsilon(event, 5, 1e-6, "pld"), places=6)
        self.assertLess(eps_pld, eps_rdp)
        fixed = accounting.RoundPrivacy(
            sigma, "fixed", num_clients=1000, cohort_size=100, mechanism="laplace"
        )
        self.assertEqual(fixed.neighboring_relation, "add_or_remove_one_user")
        # Add/remove: the subsampled Laplace of L1 sensitivity 2C at rate m / N, eps0 = 2.
        per_round = math.log1p(0.1 * math.expm1(2.0))
        self.assertAlmostEqual(fixed.pure_epsilon, per_round, places=12)
        self.assertLessEqual(accounting.epsilon(fixed, rounds=2, delta=1e-6), 2 * per_round + 1e-12)


def _dp_accounting_epsilon(event, rounds, delta, accountant):
    """Reference epsilon straight from dp_accounting, with the project's accountant settings."""
    if accountant == "pld":
        acct = dp_accounting.pld.PLDAccountant(
            value_discretization_interval=accounting.PLD_VALUE_DISCRETIZATION_INTERVAL
        )
    else:
        acct = dp_accounting.rdp.RdpAccountant(orders=accounting.RDP_ORDERS)
    acct.compose(event, rounds)
    return acct.get_epsilon(delta)


class LocalDPTest(parameterized.TestCase):
    def test_round_equals_python_loop(self):
        data = _testing.small_data()
        sim = _sim(data, mechanism="local_gaussian", clip_norm=0.8, noise_multiplier=0.5)
        self.assertEqual(sim.round.server_stages, ())
        dev, hp, key = data.to_device(), sim.make_hparams(), jax.random.key(7)
        state = sim.init(jax.random.key(0))
        want, _, _ = loop_round(sim, state, dev, hp, key)
        got, _ = sim.round_fn(state, dev, hp, key)
        _testing.assert_trees_close(got.params, want, rtol=2e-4, atol=2e-6)

    @parameterized.parameters(("poisson", 0.01), ("poisson", 1.0), ("fixed", None))
    def test_accounted_per_client_every_round_without_amplification(self, kind, q):
        sigma, rounds, delta = 4.0, 20, 1e-5
        kw = dict(sampling_rate=q) if kind == "poisson" else dict(cohort_size=10)
        rp = accounting.RoundPrivacy(sigma, kind, num_clients=100, mechanism="local_gaussian", **kw)
        self.assertEqual(rp.neighboring_relation, "local_replace_one_user")
        self.assertEqual(rp.dp_event(), dp_accounting.GaussianDpEvent(sigma / 2))  # sens. 2C
        ref = dp_accounting.rdp.RdpAccountant(list(accounting.RDP_ORDERS))
        ref.compose(dp_accounting.GaussianDpEvent(sigma / 2), rounds)
        self.assertAlmostEqual(
            accounting.epsilon(rp, rounds=rounds, delta=delta), ref.get_epsilon(delta), places=9
        )
        pld = accounting.epsilon(rp, rounds=rounds, delta=delta, accountant="pld")
        self.assertLessEqual(pld, ref.get_epsilon(delta) + 1e-6)
        self.assertGreater(pld, 0.8 * ref.get_epsilon(delta))

    def test_local_and_central_rounds_do_not_mix(self):
        acct = accounting.Accountant(delta=1e-5)
        acct.compose(accounting.RoundPrivacy(1.0, "poisson", 100, 0.1, mechanism="local_gaussian"))
        with self.assertRaisesRegex(ValueError, "guarantee"):
            acct.compose(accounting.RoundPrivacy(1.0, "poisson", 100, 0.1))


class ConfigErrorTest(parameterized.TestCase):
    @parameterized.parameters(
        (dict(adaptive_clipping=True, noise_multiplier=1.0), "clipped_count_stddev"),
        (dict(adaptive_clipping=True, clipped_count_stddev=0.1, noise_multiplier=0.3), "< 2 \\*"),
        (dict(adaptive_clipping=True, mechanism="laplace"), "mechanism='gaussian'"),
        (
            dict(adaptive_clipping=True, target_quantile=1.5, noise_multiplier=0.1),
            "target_quantile",
        ),
        (dict(adaptive_clipping=True, layer_clip_norms="Dense_0=1,.*=1"), "layer_clip_norms"),
        (dict(target_quantile=0.7), "adaptive_clipping=True"),
        (dict(name="fedavg", adaptive_clipping=True), "dp_fedavg"),
        (dict(name="fedavg", mechanism="laplace"), "dp_fedavg"),
        (dict(mechanism="exponential"), "mechanism"),
        (dict(layer_clip_norms="Dense_0=1", clip_norm=1.0), "both set"),
        (dict(layer_clip_norms="Dense_0=1,.*=1", mechanism="laplace"), "laplace"),
        (dict(layer_clip_norms="Dense_0"), "pattern=norm"),
        (dict(layer_clip_norms="Dense_0=big"), "not a number"),
        (dict(layer_clip_norms="Dense_0=0,.*=1"), "finite and > 0"),
        (dict(layer_clip_norms="Dense_0=1"), "matches no clip group"),
        (dict(layer_clip_norms="Conv_0=1,.*=1"), "match no parameter"),
        (dict(layer_clip_norms="Dense_[=1"), "not a regular expression"),
    )
    def test_bad_config_names_the_problem(self, kw, pattern):
        data = _testing.small_data()
        with self.assertRaisesRegex(ValueError, pattern):
            _sim(data, **kw)

    def test_bad_stage_pairings(self):
        sim = _sim(_testing.small_data())
        with self.assertRaisesRegex(ValueError, "clips to it in the L1 norm"):
            fedjax_dp.build_round(
                sim.client,
                sim.sampler,
                client_stages=[fedjax_dp.clip_per_client()],
                server_stages=[fedjax_dp.add_laplace_noise()],
            )
        with self.assertRaisesRegex(ValueError, "before it"):
            fedjax_dp.build_round(
                sim.client,
                sim.sampler,
                client_stages=[fedjax_dp.add_local_gaussian_noise(), fedjax_dp.clip_per_client()],
            )
        with self.assertRaisesRegex(ValueError, "client stage"):
            fedjax_dp.build_round(
                sim.client,
                sim.sampler,
                client_stages=[fedjax_dp.clip_per_client()],
                server_stages=[fedjax_dp.add_local_gaussian_noise()],
            )
        with self.assertRaisesRegex(ValueError, "norm="):
            fedjax_dp.clip_per_client(norm="linf")
        with self.assertRaisesRegex(ValueError, "initial_clip_norm"):
            fedjax_dp.adaptive_clipping(0.0, 10)

    def test_value_noise_multiplier_edge_cases(self):
        self.assertEqual(fedjax_dp.value_noise_multiplier(0.0, 0.0), 0.0)  # no noise, no privacy
        self.assertAlmostEqual(fedjax_dp.value_noise_multiplier(1.0, 1.0), 2 / math.sqrt(3))
        with self.assertRaisesRegex(ValueError, "noise_multiplier < 2"):
            fedjax_dp.value_noise_multiplier(1.0, 0.5)
        z = aggregation._value_multiplier(jnp.float32(1.0), jnp.float32(0.5))
        self.assertTrue(np.isnan(float(z)))  # if such hparams reach the round: NaN, not privacy

    @parameterized.parameters(
        dict(mechanism="laplace", unit="example"),
        dict(mechanism="local_gaussian", compositions=2),
        dict(mechanism="gauss"),
    )
    def test_bad_round_privacy(self, **kw):
        with self.assertRaisesRegex(ValueError, "mechanism"):
            accounting.RoundPrivacy(1.0, "poisson", 100, 0.1, **kw)

    def test_options_reachable_from_the_experiment_config(self):
        cfg = experiment.load_config(
            overrides={
                "algorithm.name": "dp_fedavg",
                "algorithm.adaptive_clipping": "true",
                "algorithm.target_quantile": "0.6",
                "algorithm.clip_lr": "0.1",
                "algorithm.clipped_count_stddev": "2",
                "algorithm.mechanism": "gaussian",
                "algorithm.layer_clip_norms": "Dense_0=0.5",
            }
        )
        a = cfg.algorithm
        self.assertEqual((a.adaptive_clipping, a.target_quantile, a.clip_lr), (True, 0.6, 0.1))
        self.assertEqual((a.clipped_count_stddev, a.layer_clip_norms), (2.0, "Dense_0=0.5"))
        for name in algorithms._USER_DP_OPTIONS:
            self.assertTrue(experiment.option_help("algorithm", name), msg=name)


if __name__ == "__main__":
    absltest.main()
