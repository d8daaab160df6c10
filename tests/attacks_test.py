"""Membership inference (loss-threshold attack on clients): metrics, splits and the run."""

import json
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import fedjax_dp
from fedjax_dp import attacks, experiment

DEMO = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "digits_dp_fedavg.toml"


def _clients(num_clients, per_client, dim, num_classes, seed, learnable=False):
    """Gaussian features; labels random, or (``learnable``) a fixed linear teacher's argmax."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_clients * per_client, dim)).astype(np.float32)
    y = rng.integers(0, num_classes, size=len(x)).astype(np.int32)
    if learnable:
        teacher = np.random.default_rng(1234).normal(size=(dim, num_classes))
        y = np.argmax(x @ teacher, axis=1).astype(np.int32)
    ids = np.repeat(np.arange(num_clients), per_client)
    return fedjax_dp.from_arrays(x, y, ids, num_classes=num_classes)


class MetricsTest(parameterized.TestCase):
    def test_auc_hand_computed(self):
        # pairs (in, out): (3,1) (3,2) (2,1) win, (2,2) ties: (3 + 0.5) / 4
        self.assertEqual(attacks.roc_auc([3.0, 2.0], [1.0, 2.0]), 0.875)
        self.assertEqual(attacks.roc_auc([1.0], [2.0]), 0.0)
        self.assertEqual(attacks.roc_auc([5.0, 5.0], [5.0]), 0.5)

    def test_auc_equals_pair_counting(self):
        rng = np.random.default_rng(0)
        a = np.round(rng.normal(0.3, 1.0, 57), 1)  # rounding makes ties
        b = np.round(rng.normal(0.0, 1.0, 41), 1)
        want = np.mean((a[:, None] > b[None]) + 0.5 * (a[:, None] == b[None]))
        self.assertAlmostEqual(attacks.roc_auc(a, b), want, places=12)

    def test_tpr_at_fpr_hand_computed(self):
        scores_in = [9.0, 8.0, 7.0, 6.0, 5.0, 1.0, 0.5, 0.2, 0.1, 0.0]
        scores_out = [8.5, 6.5, 4.0, 3.0, 2.0, 1.5, 1.2, 0.8, 0.3, -1.0]
        # FPR 0: threshold above 8.5 -> only 9.0 flagged: TPR 1/10.
        self.assertEqual(attacks.tpr_at_fpr(scores_in, scores_out, 0.0), 0.1)
        # FPR <= 10%: one false positive allowed (8.5); threshold above 6.5 -> 9, 8, 7.
        self.assertEqual(attacks.tpr_at_fpr(scores_in, scores_out, 0.1), 0.3)
        self.assertEqual(attacks.tpr_at_fpr(scores_in, scores_out, 0.15), 0.3)
        # FPR <= 20%: threshold above 4.0 -> 9, 8, 7, 6, 5.
        self.assertEqual(attacks.tpr_at_fpr(scores_in, scores_out, 0.2), 0.5)
        self.assertEqual(attacks.tpr_at_fpr(scores_in, scores_out, 1.0), 1.0)
        # a held-in score tied with the threshold-setting held-out score is not flagged
        self.assertEqual(attacks.tpr_at_fpr([2.0, 1.0], [2.0, 0.0], 0.0), 0.0)

    def test_bad_inputs_raise(self):
        with self.assertRaisesRegex(ValueError, "held-out"):
            attacks.roc_auc([1.0], [])
        with self.assertRaisesRegex(ValueError, "fpr"):
            attacks.tpr_at_fpr([1.0], [0.0], 1.5)


class SplitTest(absltest.TestCase):
    def test_split_keeps_whole_clients(self):
        data = _clients(20, 3, 4, 3, seed=0)
        data = fedjax_dp.from_arrays(
            np.asarray(data.x)[:-2], np.asarray(data.y)[:-2], np.repeat(np.arange(20), 3)[:-2]
        )  # the last client has 1 example
        held_in, held_out = attacks.split_clients(data, 0.25, seed=1)
        self.assertEqual((held_in.num_clients, held_out.num_clients), (15, 5))
        self.assertEqual(held_in.num_examples + held_out.num_examples, data.num_examples)
        rows = {tuple(r) for r in np.asarray(data.x)}
        seen = {tuple(r) for d in (held_in, held_out) for r in np.asarray(d.x)}
        self.assertEqual(rows, seen)
        names = set(held_in.client_names) | set(held_out.client_names)
        self.assertEqual(names, set(range(20)))
        for part in (held_in, held_out):
            for k, name in enumerate(part.client_names):
                got_x, got_y = part.client(k)
                want_x, want_y = data.client(data.client_names.index(name))
                np.testing.assert_array_equal(got_x, want_x)
                np.testing.assert_array_equal(got_y, want_y)

    def test_bad_fraction_raises(self):
        with self.assertRaisesRegex(ValueError, "holdout_fraction"):
            attacks.split_clients(_clients(4, 2, 3, 2, seed=0), 1.0, seed=0)


def _memorise(model, data, steps=300):
    """Full-batch Adam on ``data`` until the (random) labels are memorised."""
    params = model.init(jax.random.key(0))
    opt = optax.adam(0.02)
    x, y = jnp.asarray(data.x), jnp.asarray(data.y)

    def loss(p):
        return jnp.mean(fedjax_dp.cross_entropy(model.apply(p, x), y))

    @jax.jit
    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params


class AttackTest(absltest.TestCase):
    def test_client_losses_are_per_client_means(self):
        data = _clients(7, 3, 5, 4, seed=2)
        model = fedjax_dp.get_model("logistic", (5,), 4)
        params = model.init(jax.random.key(1))
        got = attacks.client_losses(model, params, data, batch_size=4)
        for k in range(7):
            x, y = data.client(k)
            want = np.mean(np.asarray(fedjax_dp.cross_entropy(model.apply(params, x), y)))
            self.assertAlmostEqual(got[k], float(want), places=5)

    def test_iid_clients_and_a_model_that_generalises_give_auc_about_half(self):
        # i.i.d. clients, learnable labels, a small linear model trained on the held-in half:
        # no memorisation, so held-in and held-out losses are alike.
        data = _clients(400, 10, 8, 10, seed=3, learnable=True)
        held_in, held_out = attacks.split_clients(data, 0.5, seed=0)
        model = fedjax_dp.get_model("logistic", (8,), 10)
        params = _memorise(model, held_in, steps=100)
        result = attacks.loss_threshold_attack(model, params, held_in, held_out)
        self.assertBetween(result["auc"], 0.42, 0.6)  # sd of the AUC ~0.03 at 200 vs 200
        self.assertEqual((result["held_in"], result["held_out"]), (200, 200))
        self.assertIn("0.1% FPR needs >= 1000 held-out clients", result["note"])
        self.assertNotIn("at 1% FPR needs", result["note"])

    def test_memorised_clients_give_auc_near_one(self):
        data = _clients(40, 5, 16, 10, seed=5)  # random labels: only memorisation helps
        held_in, held_out = attacks.split_clients(data, 0.5, seed=0)
        model = fedjax_dp.get_model("mlp", (16,), 10, hidden=[128])
        params = _memorise(model, held_in)
        result = attacks.loss_threshold_attack(model, params, held_in, held_out)
        self.assertGreater(result["auc"], 0.95)
        self.assertGreater(result["tpr_at_1pct_fpr"], 0.5)


class RunWithAttackTest(absltest.TestCase):
    def test_run_reports_the_attack(self):
        out = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, out, ignore_errors=True)
        cfg = experiment.load_config(
            DEMO,
            {
                "run.rounds": 3,
                "run.output_dir": out,
                "run.progress": False,
                "model.name": "logistic",
                "algorithm.local_epochs": 1,
                "privacy.attack": True,
                "privacy.attack_holdout": 0.25,
            },
        )
        logs = []
        result = experiment.run(cfg, log=logs.append)
        summary = json.loads(pathlib.Path(out, "summary.json").read_text())
        for key in (
            "attack_auc",
            "attack_tpr_at_1pct_fpr",
            "attack_tpr_at_0.1pct_fpr",
            "attack_held_in",
            "attack_held_out",
            "attack_note",
        ):
            self.assertIn(key, summary)
            self.assertEqual(summary[key], result.final[key])
        self.assertEqual((summary["attack_held_in"], summary["attack_held_out"]), (225, 75))
        final_line = next(line for line in logs if line.startswith("final accuracy"))
        self.assertIn(f"attack AUC {summary['attack_auc']:.3f}", final_line)

    def test_bad_holdout_names_the_option(self):
        cfg = experiment.load_config(
            DEMO, {"run.progress": False, "privacy.attack": True, "privacy.attack_holdout": 0.0}
        )
        with self.assertRaisesRegex(ValueError, "privacy.attack_holdout"):
            experiment.run(cfg, write=False, log=lambda *_: None)


if __name__ == "__main__":
    absltest.main()
