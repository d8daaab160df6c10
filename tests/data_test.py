"""Federated data: construction, validation, partitioning, built-in datasets, pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from fedjax_dp import data

METHODS = ("iid", "dirichlet", "shards", "quantity_skew")


def _balanced_labels(num_classes=10, per_class=60):
    return np.repeat(np.arange(num_classes), per_class)


def _mean_label_entropy(labels, ids, num_clients, num_classes):
    """Average over clients of the entropy (nats) of the client's label distribution."""
    ents = []
    for k in range(num_clients):
        p = np.bincount(labels[ids == k], minlength=num_classes) / np.sum(ids == k)
        p = p[p > 0]
        ents.append(-np.sum(p * np.log(p)))
    return float(np.mean(ents))


class FromArraysTest(parameterized.TestCase):
    def _random_arrays(self, n=57, feature_shape=(3, 2), num_clients=7, seed=0):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n,) + feature_shape)
        y = rng.integers(0, 4, size=n)
        ids = rng.integers(0, num_clients, size=n)
        ids[:num_clients] = np.arange(num_clients)  # every client present
        return x, y, ids

    def test_groups_by_client_preserving_order(self):
        x, y, ids = self._random_arrays()
        fd = data.from_arrays(x, y, ids)
        self.assertEqual(fd.num_clients, 7)
        self.assertEqual(fd.num_examples, 57)
        self.assertEqual(fd.feature_shape, (3, 2))
        self.assertEqual(fd.client_names, tuple(range(7)))
        self.assertEqual(fd.x.dtype, np.float32)
        self.assertEqual(fd.y.dtype, np.int32)
        self.assertEqual(fd.offsets.dtype, np.int32)
        self.assertEqual(fd.counts.dtype, np.int32)
        expected_offset = 0
        for k in range(7):
            # Plain-loop reference: the examples of client k, in their original order.
            ref_x = np.array([x[i] for i in range(len(ids)) if ids[i] == k], np.float32)
            ref_y = np.array([y[i] for i in range(len(ids)) if ids[i] == k])
            self.assertEqual(int(fd.offsets[k]), expected_offset)
            self.assertEqual(int(fd.counts[k]), len(ref_y))
            expected_offset += len(ref_y)
            xk, yk = fd.client(k)
            np.testing.assert_array_equal(xk, ref_x)
            np.testing.assert_array_equal(yk, ref_y)
            lo, hi = int(fd.offsets[k]), int(fd.offsets[k] + fd.counts[k])
            np.testing.assert_array_equal(fd.x[lo:hi], ref_x)
        self.assertEqual(expected_offset, 57)
        self.assertEqual(fd.max_count, max(int(np.sum(ids == k)) for k in range(7)))
        self.assertIsInstance(fd.max_count, int)

    def test_client_returns_copies(self):
        x, y, ids = self._random_arrays()
        fd = data.from_arrays(x, y, ids)
        xk, _ = fd.client(0)
        xk[:] = 123.0
        self.assertFalse(np.any(fd.x == 123.0))

    def test_client_index_out_of_range(self):
        fd = data.from_arrays(*self._random_arrays())
        with self.assertRaisesRegex(ValueError, "k=7"):
            fd.client(7)

    def test_string_ids(self):
        x = np.arange(6, dtype=np.float32)[:, None]
        y = np.array([0, 1, 0, 1, 1, 0])
        ids = np.array(["bob", "alice", "bob", "carol", "alice", "bob"])
        fd = data.from_arrays(x, y, ids)
        self.assertEqual(fd.client_names, ("alice", "bob", "carol"))
        np.testing.assert_array_equal(fd.counts, [2, 3, 1])
        np.testing.assert_array_equal(fd.offsets, [0, 2, 5])
        np.testing.assert_array_equal(fd.x[:, 0], [1, 4, 0, 2, 5, 3])
        np.testing.assert_array_equal(fd.y, [1, 1, 0, 0, 0, 1])
        # A Python list of strings works too.
        fd2 = data.from_arrays(x, y, list(ids))
        np.testing.assert_array_equal(fd2.x, fd.x)

    def test_num_classes_inference_and_override(self):
        x = np.zeros((4, 2))
        fd = data.from_arrays(x, [0, 4, 2, 1], [0, 0, 1, 1])
        self.assertEqual(fd.num_classes, 5)
        fd = data.from_arrays(x, [0, 4, 2, 1], [0, 0, 1, 1], num_classes=10)
        self.assertEqual(fd.num_classes, 10)

    def test_integral_float_labels_accepted(self):
        fd = data.from_arrays(np.zeros((3, 1)), np.array([0.0, 1.0, 2.0]), [0, 1, 1])
        np.testing.assert_array_equal(fd.y, [0, 1, 2])
        self.assertEqual(fd.y.dtype, np.int32)

    @parameterized.named_parameters(
        (
            "length_mismatch_y",
            lambda: data.from_arrays(np.zeros((3, 2)), [0, 1], [0, 1, 2]),
            r"len\(x\)=3, len\(y\)=2, len\(client_ids\)=3",
        ),
        (
            "length_mismatch_ids",
            lambda: data.from_arrays(np.zeros((3, 2)), [0, 1, 1], [0, 1]),
            "client_ids",
        ),
        ("no_examples", lambda: data.from_arrays(np.zeros((0, 2)), [], []), "x has no examples"),
        (
            "fractional_labels",
            lambda: data.from_arrays(np.zeros((2, 1)), [0.0, 1.5], [0, 1]),
            "y .*1.5",
        ),
        ("string_labels", lambda: data.from_arrays(np.zeros((2, 1)), ["a", "b"], [0, 1]), "y"),
        (
            "negative_label",
            lambda: data.from_arrays(np.zeros((2, 1)), [-1, 1], [0, 1]),
            "y contains the label -1",
        ),
        (
            "label_too_large",
            lambda: data.from_arrays(np.zeros((2, 1)), [0, 3], [0, 1], num_classes=3),
            "label 3 >= num_classes=3",
        ),
        (
            "nan_features",
            lambda: data.from_arrays(np.array([[0.0], [np.nan]]), [0, 1], [0, 1]),
            "x contains non-finite",
        ),
        (
            "inf_features",
            lambda: data.from_arrays(np.array([[np.inf], [0.0]]), [0, 1], [0, 1]),
            "x contains non-finite",
        ),
        (
            "num_classes_one",
            lambda: data.from_arrays(np.zeros((2, 1)), [0, 0], [0, 1], num_classes=1),
            "num_classes=1",
        ),
        (
            "num_classes_inferred_one",
            lambda: data.from_arrays(np.zeros((2, 1)), [0, 0], [0, 1]),
            "num_classes=1",
        ),
        (
            "mixed_ids",
            lambda: data.from_arrays(np.zeros((2, 1)), [0, 1], np.array([1, "a"], dtype=object)),
            "client_ids",
        ),
    )
    def test_bad_input(self, fn, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            fn()


class PartitionTest(parameterized.TestCase):
    @parameterized.parameters(*METHODS)
    def test_valid_and_deterministic(self, method):
        y = _balanced_labels()
        ids = data.partition(y, num_clients=12, method=method, seed=3)
        self.assertEqual(ids.dtype, np.int32)
        self.assertEqual(ids.shape, y.shape)
        self.assertEqual(set(ids.tolist()), set(range(12)))  # covers range, none empty
        sizes = np.bincount(ids, minlength=12)
        self.assertGreaterEqual(sizes.min(), 1)
        self.assertEqual(sizes.sum(), len(y))
        np.testing.assert_array_equal(ids, data.partition(y, num_clients=12, method=method, seed=3))
        self.assertFalse(
            np.array_equal(ids, data.partition(y, num_clients=12, method=method, seed=4))
        )

    def test_iid_near_equal(self):
        ids = data.partition(np.zeros(103), num_clients=10, seed=0)
        sizes = np.bincount(ids)
        self.assertLessEqual(sizes.max() - sizes.min(), 1)

    def test_single_client(self):
        for method in METHODS:
            ids = data.partition(_balanced_labels(), num_clients=1, method=method)
            self.assertTrue(np.all(ids == 0), method)

    def test_dirichlet_small_alpha_is_skewed(self):
        y = _balanced_labels(num_classes=10, per_class=200)
        iid = data.partition(y, num_clients=20, method="iid", seed=0)
        skew = data.partition(y, num_clients=20, method="dirichlet", alpha=0.1, seed=0)
        h_iid = _mean_label_entropy(y, iid, 20, 10)
        h_skew = _mean_label_entropy(y, skew, 20, 10)
        self.assertGreater(h_iid, 0.9 * np.log(10))  # close to uniform
        self.assertLess(h_skew, 0.5 * h_iid)
        # Large alpha is close to IID.
        flat = data.partition(y, num_clients=20, method="dirichlet", alpha=1000.0, seed=0)
        self.assertGreater(_mean_label_entropy(y, flat, 20, 10), 0.9 * np.log(10))

    def test_dirichlet_min_examples(self):
        y = _balanced_labels(num_classes=10, per_class=50)
        ids = data.partition(
            y, num_clients=10, method="dirichlet", alpha=0.3, min_examples=10, seed=1
        )
        self.assertGreaterEqual(np.bincount(ids, minlength=10).min(), 10)

    def test_dirichlet_gives_up_with_clear_error(self):
        y = _balanced_labels(num_classes=2, per_class=50)
        with self.assertRaisesRegex(ValueError, "larger alpha"):
            data.partition(y, num_clients=90, method="dirichlet", alpha=0.01)

    def test_dirichlet_keeps_each_class_in_full(self):
        y = _balanced_labels(num_classes=5, per_class=37)
        ids = data.partition(y, num_clients=6, method="dirichlet", alpha=0.5, seed=2)
        per_class = np.zeros(5, int)
        for k in range(6):
            per_class += np.bincount(y[ids == k], minlength=5)
        np.testing.assert_array_equal(per_class, np.full(5, 37))

    @parameterized.parameters(1, 2, 3)
    def test_shards_limit_labels_per_client(self, shards_per_client):
        # 10 classes x 60 examples, 10 clients: shard size divides 60, so no shard straddles.
        y = _balanced_labels(num_classes=10, per_class=60)
        ids = data.partition(
            y, num_clients=10, method="shards", shards_per_client=shards_per_client, seed=0
        )
        sizes = np.bincount(ids)
        np.testing.assert_array_equal(sizes, np.full(10, 60))
        distinct = [len(np.unique(y[ids == k])) for k in range(10)]
        self.assertLessEqual(max(distinct), shards_per_client)
        if shards_per_client == 1:
            self.assertEqual(distinct, [1] * 10)

    def test_quantity_skew_unequal_sizes(self):
        y = np.zeros(2000, int)
        ids = data.partition(y, num_clients=20, method="quantity_skew", sigma=1.5, seed=0)
        sizes = np.bincount(ids, minlength=20)
        self.assertGreater(sizes.max() / sizes.min(), 10.0)
        equal = np.bincount(data.partition(y, num_clients=20, method="quantity_skew", sigma=0.0))
        self.assertLessEqual(equal.max() - equal.min(), 1)

    def test_quantity_skew_min_examples(self):
        ids = data.partition(
            np.zeros(500),
            num_clients=25,
            method="quantity_skew",
            sigma=3.0,
            min_examples=15,
            seed=0,
        )
        sizes = np.bincount(ids, minlength=25)
        self.assertGreaterEqual(sizes.min(), 15)
        self.assertEqual(sizes.sum(), 500)

    @parameterized.named_parameters(
        ("zero_clients", {"num_clients": 0}, "num_clients=0"),
        ("too_many_clients", {"num_clients": 31}, "num_clients=31 exceeds the 30 examples"),
        ("float_clients", {"num_clients": 2.5}, "num_clients"),
        (
            "unknown_method",
            {"num_clients": 3, "method": "pathological"},
            "method='pathological'.*iid, dirichlet, shards, quantity_skew",
        ),
        ("zero_alpha", {"num_clients": 3, "alpha": 0.0}, "alpha=0.0"),
        ("negative_alpha", {"num_clients": 3, "alpha": -1.0}, "alpha=-1.0"),
        ("inf_alpha", {"num_clients": 3, "alpha": float("inf")}, "alpha=inf"),
        ("nan_alpha", {"num_clients": 3, "alpha": float("nan")}, "alpha=nan"),
        ("zero_shards", {"num_clients": 3, "shards_per_client": 0}, "shards_per_client=0"),
        (
            "too_many_shards",
            {"num_clients": 3, "method": "shards", "shards_per_client": 11},
            "shards_per_client=11",
        ),
        ("negative_sigma", {"num_clients": 3, "sigma": -0.5}, "sigma=-0.5"),
        ("zero_min_examples", {"num_clients": 3, "min_examples": 0}, "min_examples=0"),
        ("infeasible_min_examples", {"num_clients": 3, "min_examples": 11}, "min_examples=11"),
    )
    def test_bad_input(self, kwargs, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            data.partition(np.arange(30) % 3, **kwargs)

    def test_empty_labels(self):
        with self.assertRaisesRegex(ValueError, "y has no examples"):
            data.partition(np.array([], int), num_clients=1)


class MakeFederatedTest(absltest.TestCase):
    def test_matches_partition_then_from_arrays(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(200, 4)).astype(np.float32)
        y = np.repeat(np.arange(4), 50)
        fd = data.make_federated(x, y, num_clients=8, method="dirichlet", seed=5, alpha=0.5)
        ids = data.partition(y, num_clients=8, method="dirichlet", seed=5, alpha=0.5)
        ref = data.from_arrays(x, y, ids)
        for a, b in zip(jax.tree.leaves(fd), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(a, b)
        self.assertEqual(fd.num_classes, 4)
        self.assertEqual(data.make_federated(x, y, num_clients=8, num_classes=7).num_classes, 7)


class LoadDigitsTest(absltest.TestCase):
    def test_shapes_range_split_and_determinism(self):
        (x, y), (xt, yt) = data.load_digits(test_fraction=0.25, seed=0)
        self.assertEqual(len(x) + len(xt), 1797)
        self.assertEqual(len(xt), round(1797 * 0.25))
        self.assertEqual(x.shape[1:], (64,))
        self.assertEqual(xt.shape[1:], (64,))
        self.assertEqual(x.dtype, np.float32)
        self.assertEqual(y.dtype, np.int32)
        self.assertEqual(x.min(), 0.0)
        self.assertEqual(x.max(), 1.0)
        self.assertEqual(set(y.tolist()), set(range(10)))
        (x2, _), (_, yt2) = data.load_digits(test_fraction=0.25, seed=0)
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(yt, yt2)
        (x3, _), _ = data.load_digits(test_fraction=0.25, seed=1)
        self.assertFalse(np.array_equal(x, x3))
        # Train and test together are exactly the whole dataset (a split, not a resample).
        from sklearn import datasets

        full_x, full_y = datasets.load_digits(return_X_y=True)
        rows = np.concatenate([np.concatenate([x, xt]), np.concatenate([y, yt])[:, None]], 1)
        full = np.concatenate([full_x / 16.0, full_y[:, None]], 1).astype(np.float32)
        np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(full, axis=0))
        np.testing.assert_array_equal(np.bincount(np.concatenate([y, yt])), np.bincount(full_y))

    def test_bad_test_fraction(self):
        for bad in (0.0, 1.0, -0.1, 1.5, "0.2"):
            with self.assertRaisesRegex(ValueError, "test_fraction"):
                data.load_digits(test_fraction=bad)


class SyntheticTest(absltest.TestCase):
    def test_shapes_and_determinism(self):
        fd = data.synthetic_classification(
            num_clients=5, examples_per_client=7, feature_shape=(4, 4, 1), num_classes=3, seed=0
        )
        self.assertEqual(fd.num_clients, 5)
        self.assertEqual(fd.num_examples, 35)
        self.assertEqual(fd.feature_shape, (4, 4, 1))
        self.assertEqual(fd.max_count, 7)
        self.assertEqual(fd.num_classes, 3)
        self.assertEqual(fd.x.dtype, np.float32)
        self.assertEqual(fd.y.dtype, np.int32)
        np.testing.assert_array_equal(fd.counts, np.full(5, 7))
        np.testing.assert_array_equal(fd.offsets, np.arange(5) * 7)
        self.assertTrue(np.all((fd.y >= 0) & (fd.y < 3)))
        again = data.synthetic_classification(
            num_clients=5, examples_per_client=7, feature_shape=(4, 4, 1), num_classes=3, seed=0
        )
        np.testing.assert_array_equal(fd.x, again.x)
        np.testing.assert_array_equal(fd.y, again.y)
        other = data.synthetic_classification(
            num_clients=5, examples_per_client=7, feature_shape=(4, 4, 1), num_classes=3, seed=1
        )
        self.assertFalse(np.array_equal(fd.x, other.x))

    def test_classes_are_separated(self):
        fd = data.synthetic_classification(
            num_clients=10, examples_per_client=50, feature_shape=(32,), num_classes=4, seed=0
        )
        # Nearest class mean (estimated from the data) classifies well above chance.
        means = np.stack([fd.x[fd.y == c].mean(0) for c in range(4)])
        pred = np.argmin(((fd.x[:, None] - means[None]) ** 2).sum(-1), axis=1)
        self.assertGreater(np.mean(pred == fd.y), 0.8)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "num_clients"):
            data.synthetic_classification(num_clients=0, examples_per_client=3)
        with self.assertRaisesRegex(ValueError, "examples_per_client"):
            data.synthetic_classification(num_clients=2, examples_per_client=0)
        with self.assertRaisesRegex(ValueError, "num_classes"):
            data.synthetic_classification(num_clients=2, examples_per_client=3, num_classes=1)
        with self.assertRaisesRegex(ValueError, "feature_shape"):
            data.synthetic_classification(
                num_clients=2, examples_per_client=3, feature_shape=(0, 3)
            )


class PytreeTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.fd = data.from_arrays(
            rng.normal(size=(20, 3)),
            rng.integers(0, 3, 20),
            np.repeat(["a", "b", "c", "d"], 5),
            num_classes=4,
        )

    def test_leaves_are_the_four_arrays(self):
        leaves = jax.tree.leaves(self.fd)
        self.assertLen(leaves, 4)
        for leaf, arr in zip(leaves, (self.fd.x, self.fd.y, self.fd.offsets, self.fd.counts)):
            self.assertIs(leaf, arr)

    def test_to_device(self):
        dev = self.fd.to_device()
        for leaf in (dev.x, dev.y, dev.offsets, dev.counts):
            self.assertIsInstance(leaf, jax.Array)
        np.testing.assert_array_equal(np.asarray(dev.x), self.fd.x)
        self.assertEqual(dev.num_classes, 4)
        self.assertEqual(dev.max_count, 5)
        self.assertEqual(dev.client_names, ("a", "b", "c", "d"))
        xk, _ = dev.client(2)
        self.assertIsInstance(xk, np.ndarray)
        np.testing.assert_array_equal(xk, self.fd.client(2)[0])

    def test_through_jit(self):
        @jax.jit
        def f(d):
            # Static fields are Python ints inside the trace.
            self.assertIsInstance(d.max_count, int)
            self.assertIsInstance(d.num_classes, int)
            rows = d.offsets[1] + jnp.arange(d.max_count)
            return d.replace(x=d.x * 2), jnp.sum(jnp.take(d.y, rows)), d.num_classes

        out, s, nc = f(self.fd.to_device())
        self.assertIsInstance(out, data.FederatedData)
        self.assertEqual(out.num_classes, 4)
        self.assertEqual(out.max_count, 5)
        self.assertEqual(out.client_names, ("a", "b", "c", "d"))
        self.assertEqual(int(nc), 4)
        np.testing.assert_allclose(np.asarray(out.x), 2 * self.fd.x, rtol=1e-6)
        self.assertEqual(int(s), int(np.sum(self.fd.y[5:10])))


if __name__ == "__main__":
    absltest.main()
