"""Tests of the data sources: TFDS, FedProx Synthetic(alpha, beta), tables and folders.

TFDS without TensorFlow: ``tfds.testing.mock_data`` serves ``tfds.data_source`` (it replaces
``DatasetBuilder.as_data_source`` and makes ``download_and_prepare`` a no-op), but a mocked
source only supports ``source[i]`` (its ``__getitems__`` is unbound in tensorflow-datasets
4.9), which is what :func:`load_tfds` uses. The loader refuses to start a preparation without
TensorFlow, so the mocked tests patch ``sources._tensorflow_installed``. The unmocked read path
is tested on a tiny ArrayRecord dataset written here without TensorFlow.
"""

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from unittest import mock

import numpy as np
from absl.testing import absltest, parameterized

from fedjax_dp import experiment
from fedjax_dp.data import sources

tfds = sources._import_tfds()

NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "emnist": 62}
SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
SHAPES["emnist"] = (28, 28, 1)


def _tempdir(test: absltest.TestCase) -> pathlib.Path:
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return pathlib.Path(path)


def _mocked(num_examples=30):
    stack = mock.patch.object(sources, "_tensorflow_installed", return_value=True)
    return tfds.testing.mock_data(num_examples=num_examples), stack


def _fake_mnist_rows(seed, n):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    labels = np.arange(n) % 10
    return images, labels


def _write_array_record_mnist(data_dir: str) -> None:
    """Prepares a tiny 'mnist' (3.0.1) in array_record format without TensorFlow.

    TFDS encodes images with TensorFlow when it writes; here Pillow does the PNG encoding.
    """
    from PIL import Image
    from tensorflow_datasets.core.features import image_feature

    if not hasattr(image_feature, "_ImageEncoder"):
        raise absltest.SkipTest("this tensorflow-datasets version has no _ImageEncoder")

    def encode_png(self, np_image):
        del self
        buf = io.BytesIO()
        Image.fromarray(np_image[..., 0]).save(buf, format="PNG")
        return buf.getvalue()

    class Mnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("3.0.1")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(28, 28, 1)),
                        "label": tfds.features.ClassLabel(num_classes=10),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples(0, 50), "test": self._generate_examples(1, 20)}

        def _generate_examples(self, seed, n):
            images, labels = _fake_mnist_rows(seed, n)
            for i in range(n):
                yield i, {"image": images[i], "label": int(labels[i])}

    with mock.patch.object(image_feature._ImageEncoder, "_encode_image", encode_png):
        Mnist(data_dir=data_dir, file_format="array_record").download_and_prepare()


class TfdsMockTest(parameterized.TestCase):
    @parameterized.parameters(*sources.TFDS_DATASETS)
    def test_arrays(self, name):
        data_ctx, tf_ctx = _mocked()
        with data_ctx, tf_ctx:
            (x, y), (xt, yt) = sources.load_tfds(name, data_dir="/nonexistent/tfds")
        self.assertEqual(x.shape, (30, *SHAPES[name]))
        self.assertEqual(xt.shape, (30, *SHAPES[name]))
        self.assertEqual(x.dtype, np.float32)
        self.assertEqual(y.dtype, np.int32)
        self.assertGreaterEqual(x.min(), 0.0)
        self.assertLessEqual(x.max(), 1.0)
        self.assertGreater(x.max(), 0.5)  # scaled, not all zero
        self.assertTrue(np.all((y >= 0) & (y < NUM_CLASSES[name])))
        self.assertTrue(np.all((yt >= 0) & (yt < NUM_CLASSES[name])))

    def test_emnist_config(self):
        data_ctx, tf_ctx = _mocked()
        with data_ctx, tf_ctx:
            (x, y), _ = sources.load_tfds("emnist/letters")
        self.assertEqual(x.shape, (30, 28, 28, 1))
        self.assertLess(y.max(), 37)

    def test_experiment_partitions_tfds(self):
        cfg = experiment.load_config(
            overrides={
                "data.source": "tfds",
                "data.name": "fashion_mnist",
                "data.data_dir": "/nonexistent/tfds",
                "data.num_clients": 6,
                "data.partition": "iid",
            }
        )
        data_ctx, tf_ctx = _mocked(num_examples=60)
        with data_ctx, tf_ctx:
            train, (xt, yt) = experiment.load_data(cfg)
        self.assertEqual(train.num_clients, 6)
        self.assertEqual(train.num_examples, 60)
        self.assertEqual(train.feature_shape, (28, 28, 1))
        self.assertEqual(xt.shape, (60, 28, 28, 1))
        self.assertEqual(len(yt), 60)


class TfdsFilesTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.data_dir = os.path.join(cls.tmp, "tfds")
        _write_array_record_mnist(cls.data_dir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def test_reads_prepared_array_record(self):
        (x, y), (xt, yt) = sources.load_tfds("mnist", data_dir=self.data_dir, download=False)
        self.assertEqual(x.shape, (50, 28, 28, 1))
        self.assertEqual(xt.shape, (20, 28, 28, 1))
        # TFDS shuffles records when it writes: compare as sets of (image, label) rows.
        for (got_x, got_y), seed, n in (((x, y), 0, 50), ((xt, yt), 1, 20)):
            images, labels = _fake_mnist_rows(seed, n)
            want = np.concatenate([images.reshape(n, -1) / 255.0, labels[:, None]], 1)
            got = np.concatenate([got_x.reshape(n, -1), got_y[:, None]], 1)
            np.testing.assert_allclose(
                np.unique(got, axis=0), np.unique(want.astype(np.float32), axis=0), atol=1e-6
            )

    def test_split_slices(self):
        (x, _), (xt, _) = sources.load_tfds(
            "mnist", data_dir=self.data_dir, split="train[:20%]", test_split="test[:5]"
        )
        self.assertEqual(len(x), 10)
        self.assertEqual(len(xt), 5)

    def test_unknown_split(self):
        with self.assertRaisesRegex(ValueError, "mnist.*Unknown split 'validation'"):
            sources.load_tfds("mnist", data_dir=self.data_dir, test_split="validation")

    def test_tfrecord_prepared_is_explained(self):
        copy = os.path.join(self.tmp, "tfrecord")
        shutil.copytree(self.data_dir, copy, dirs_exist_ok=True)
        info = pathlib.Path(copy, "mnist", "3.0.1", "dataset_info.json")
        meta = json.loads(info.read_text())
        meta["fileFormat"] = "tfrecord"
        info.write_text(json.dumps(meta))
        with self.assertRaisesRegex(sources.DataNotFoundError, "tfrecord.*array_record"):
            sources.load_tfds("mnist", data_dir=copy)


class TfdsErrorTest(absltest.TestCase):
    def test_missing_without_download(self):
        with tempfile.TemporaryDirectory() as d, self.assertRaises(sources.DataNotFoundError) as cm:
            sources.load_tfds("cifar10", data_dir=d, download=False)
        msg = str(cm.exception)
        for part in ("'cifar10'", d, "download=False", "tfds build cifar10", "data_dir"):
            self.assertIn(part, msg)
        self.assertNotIn("\n", msg)

    def test_missing_and_no_tensorflow_fails_fast(self):
        if sources._tensorflow_installed():
            self.skipTest("TensorFlow is installed: the loader would try to download")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as d, self.assertRaises(sources.DataNotFoundError) as cm:
            sources.load_tfds("mnist", data_dir=d)
        self.assertLess(time.perf_counter() - start, 10.0)  # no download attempt
        msg = str(cm.exception)
        for part in ("'mnist'", d, "TensorFlow", "--file_format=array_record", "data_dir=DIR"):
            self.assertIn(part, msg)

    def test_failed_download_is_one_line(self):
        def fail(*args, **kwargs):
            raise ConnectionError("Failed to resolve 'storage.googleapis.com'\nmore detail")

        with (
            tempfile.TemporaryDirectory() as d,
            mock.patch.object(sources, "_tensorflow_installed", return_value=True),
            mock.patch.object(
                tfds.core.dataset_builder.DatasetBuilder, "download_and_prepare", fail
            ),
            self.assertRaises(sources.DataNotFoundError) as cm,
        ):
            sources.load_tfds("fashion_mnist", data_dir=d)
        msg = str(cm.exception)
        self.assertIn("'fashion_mnist'", msg)
        self.assertIn("ConnectionError: Failed to resolve", msg)
        self.assertIn("network", msg)
        self.assertNotIn("\n", msg)
        self.assertIsNone(cm.exception.__cause__)

    def test_bad_names(self):
        with self.assertRaisesRegex(ValueError, "no dataset 'mnistt'.*mnist, fashion_mnist"):
            sources.load_tfds("mnistt")
        with self.assertRaisesRegex(ValueError, "emnist/nope"):
            sources.load_tfds("emnist/nope")
        with self.assertRaisesRegex(ValueError, "not an image-classification dataset"):
            sources.load_tfds("imdb_reviews")
        with self.assertRaisesRegex(ValueError, "name"):
            sources.load_tfds("")

    def test_cli_reports_missing_data_in_one_line(self):
        from fedjax_dp import cli

        with tempfile.TemporaryDirectory() as d, mock.patch("sys.stderr", new=io.StringIO()) as err:
            code = cli.main(
                ["run", "--data.source", "tfds", "--data.data_dir", d, "--data.download", "false"]
            )
        self.assertEqual(code, 2)
        self.assertEqual(len(err.getvalue().strip().splitlines()), 1)
        self.assertIn("'mnist'", err.getvalue())

    def test_import_is_lazy(self):
        code = "import sys, fedjax_dp; print('tensorflow_datasets' in sys.modules)"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        self.assertEqual(out.stdout.strip(), "False")


class FedProxSyntheticTest(parameterized.TestCase):
    def test_shapes_split_and_names(self):
        s = sources.fedprox_synthetic(0.5, 0.5, seed=0)
        train, test = s.train, s.test
        self.assertEqual(train.num_clients, 30)
        self.assertEqual(test.num_clients, 30)
        self.assertEqual(train.feature_shape, (60,))
        self.assertEqual(train.num_classes, 10)
        self.assertEqual(train.x.dtype, np.float32)
        self.assertEqual(train.y.dtype, np.int32)
        self.assertEqual(train.client_names[:2], ("f_00000", "f_00001"))
        self.assertEqual(train.client_names, test.client_names)
        sizes = train.counts.astype(int) + test.counts
        self.assertGreaterEqual(sizes.min(), 50)
        np.testing.assert_array_equal(train.counts, [int(0.9 * n) for n in sizes])
        self.assertGreaterEqual(test.counts.min(), 5)
        np.testing.assert_array_equal(train.offsets, np.cumsum(train.counts) - train.counts)
        for fd in (train, test):
            self.assertTrue(np.all((fd.y >= 0) & (fd.y < 10)))
            self.assertEqual(fd.max_count, int(fd.counts.max()))
        self.assertEqual(s.weights.shape, (30, 60, 10))
        self.assertEqual(s.biases.shape, (30, 10))
        self.assertEqual(s.input_means.shape, (30, 60))

    @parameterized.parameters(False, True)
    def test_labels_follow_each_devices_model(self, iid):
        s = sources.fedprox_synthetic(1.0, 1.0, num_devices=40, iid=iid, seed=1)
        for fd in (s.train, s.test):
            device = np.repeat(np.arange(40), fd.counts)
            logits = np.einsum("nd,ndc->nc", fd.x, s.weights[device]) + s.biases[device]
            # x is stored as float32; labels were computed in float64 (near-ties may flip).
            self.assertGreater(np.mean(np.argmax(logits, 1) == fd.y), 0.999)

    def test_deterministic_by_seed(self):
        a = sources.fedprox_synthetic(1.0, 1.0, num_devices=20, seed=3)
        b = sources.fedprox_synthetic(1.0, 1.0, num_devices=20, seed=3)
        c = sources.fedprox_synthetic(1.0, 1.0, num_devices=20, seed=4)
        for fa, fb in ((a.train, b.train), (a.test, b.test)):
            np.testing.assert_array_equal(fa.x, fb.x)
            np.testing.assert_array_equal(fa.y, fb.y)
            np.testing.assert_array_equal(fa.counts, fb.counts)
        self.assertFalse(np.array_equal(a.train.counts, c.train.counts))

    def test_samples_per_device_lognormal_4_2_plus_50(self):
        s = sources.fedprox_synthetic(0.0, 0.0, num_devices=1000, seed=0)
        extra = s.train.counts.astype(np.int64) + s.test.counts - 50  # int(lognormal(4, 2))
        self.assertGreaterEqual(extra.min(), 0)
        # P(int(L) < e^t) = P(L < e^t) for non-integer e^t: Phi((t - 4) / 2).
        for t, p in ((2.0, 0.1587), (4.0, 0.5), (6.0, 0.8413), (8.0, 0.9772)):
            self.assertAlmostEqual(np.mean(extra < np.exp(t)), p, delta=0.05)

    def test_sigma_diagonal(self):
        s = sources.fedprox_synthetic(0.0, 1.0, num_devices=200, seed=0)
        x, counts = s.train.x.astype(np.float64), s.train.counts
        device = np.repeat(np.arange(200), counts)
        means = np.zeros((200, 60))
        np.add.at(means, device, x)
        means /= counts[:, None]
        within = ((x - means[device]) ** 2).sum(0) / (len(x) - 200)
        want = np.arange(1, 61) ** -1.2
        np.testing.assert_allclose(within, want, rtol=0.05)
        # The device means themselves are v_k ~ N(B_k, 1).
        np.testing.assert_allclose(means, s.input_means, atol=0.5)

    def test_alpha_moves_models_but_never_labels(self):
        # u_k shifts every entry of W_k and b_k: all logits move together, labels do not.
        a = sources.fedprox_synthetic(0.0, 0.5, num_devices=300, seed=5)
        b = sources.fedprox_synthetic(1.0, 0.5, num_devices=300, seed=5)
        np.testing.assert_array_equal(a.train.x, b.train.x)
        self.assertGreater(np.mean(a.train.y == b.train.y), 0.999)

        # ...while the devices' models are measurably further apart with alpha = 1:
        # E|W_j - W_k|^2 / (d c) = 2 + 2 alpha^2, and Var_k(mean W_k) = alpha^2 + 1 / (d c).
        def spread(s):
            w = s.weights.reshape(300, -1)
            return np.mean((w[:150] - w[150:]) ** 2), np.var(w.mean(1))

        (dist0, var0), (dist1, var1) = spread(a), spread(b)
        self.assertAlmostEqual(dist0, 2.0, delta=0.1)
        self.assertAlmostEqual(dist1, 4.0, delta=1.0)
        self.assertLess(var0, 0.01)
        self.assertAlmostEqual(var1, 1.0, delta=0.3)
        # alpha is the standard deviation of u_k (as the reference's code has it), not its
        # variance: at alpha = 0.5 the spread is 2.5 and the variance 0.25, not 3 and 0.5.
        half = sources.fedprox_synthetic(0.5, 0.5, num_devices=300, seed=5)
        dist_half, var_half = spread(half)
        self.assertAlmostEqual(dist_half, 2.5, delta=0.25)
        self.assertAlmostEqual(var_half, 0.25, delta=0.1)
        # Likewise beta: Var_k(mean_j v_kj) = beta^2 + 1/60.
        self.assertAlmostEqual(np.var(half.input_means.mean(1)), 0.25 + 1 / 60, delta=0.1)

    def test_heterogeneity_grows_from_0_0_to_1_1(self):
        def stats(alpha, beta):
            s = sources.fedprox_synthetic(alpha, beta, num_devices=300, seed=2)
            fd = s.train
            device = np.repeat(np.arange(300), fd.counts)
            hist = np.zeros((300, 10))
            np.add.at(hist, (device, fd.y), 1.0)
            p = hist / hist.sum(1, keepdims=True)
            entropy = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-30)), 0.0), 1)
            return np.var(s.input_means.mean(1)), entropy.mean()

        (var00, ent00), (var11, ent11) = stats(0.0, 0.0), stats(1.0, 1.0)
        # Input means: Var_k(mean_j v_kj) = beta^2 + 1/60.
        self.assertLess(var00, 0.05)
        self.assertAlmostEqual(var11, 1.0 + 1 / 60, delta=0.3)
        # Devices' labels are more concentrated (less shared) when beta = 1.
        self.assertLess(ent11, ent00 - 0.05)

    def test_iid_variant_shares_one_model(self):
        s = sources.fedprox_synthetic(1.0, 0.0, num_devices=10, iid=True, seed=0)
        np.testing.assert_array_equal(s.weights[0], s.weights[9])
        np.testing.assert_array_equal(s.input_means, np.zeros((10, 60)))
        self.assertLess(abs(float(s.train.x.mean())), 0.05)

    def test_thousands_of_devices(self):
        start = time.perf_counter()
        s = sources.fedprox_synthetic(1.0, 1.0, num_devices=2000, seed=0)
        self.assertLess(time.perf_counter() - start, 20.0)
        self.assertEqual(s.train.num_clients, 2000)

    @parameterized.named_parameters(
        ("negative_alpha", dict(alpha=-1.0, beta=0.0), "alpha=-1.0"),
        ("nan_beta", dict(alpha=0.0, beta=float("nan")), "beta=nan"),
        ("zero_devices", dict(alpha=0.0, beta=0.0, num_devices=0), "num_devices=0"),
        ("one_class", dict(alpha=0.0, beta=0.0, num_classes=1), "num_classes=1"),
        ("fraction", dict(alpha=0.0, beta=0.0, train_fraction=1.0), "train_fraction=1.0"),
    )
    def test_bad_input(self, kwargs, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            sources.fedprox_synthetic(**kwargs)

    def test_experiment_source(self):
        cfg = experiment.load_config(
            overrides={
                "data.source": "fedprox_synthetic",
                "data.alpha": 0.5,
                "data.beta": 0.5,
                "data.num_devices": 12,
                "run.seed": 7,
            }
        )
        train, (xt, yt) = experiment.load_data(cfg)
        s = sources.fedprox_synthetic(0.5, 0.5, num_devices=12, seed=7)
        self.assertEqual(train.num_clients, 12)
        self.assertEqual(train.num_classes, 10)
        np.testing.assert_array_equal(train.x, s.train.x)
        np.testing.assert_array_equal(train.counts, s.train.counts)
        np.testing.assert_array_equal(xt, s.test.x)
        np.testing.assert_array_equal(yt, s.test.y)

    def test_paper_config_loads(self):
        path = pathlib.Path(__file__).parent.parent / "experiments" / "fedprox_synthetic.toml"
        cfg = experiment.load_config(path)
        self.assertEqual(cfg.data.source, "fedprox_synthetic")
        self.assertEqual((cfg.data.alpha, cfg.data.beta, cfg.data.num_devices), (1.0, 1.0, 30))
        a = cfg.algorithm
        self.assertEqual((a.cohort_size, a.batch_size, a.local_epochs), (10, 10, 20))
        self.assertEqual((a.client_lr, a.weighting, cfg.run.rounds), (0.01, "num_examples", 200))


class TableTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.dir = _tempdir(self)
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(12, 3)).round(3)
        self.y = np.arange(12) % 4
        self.ids = np.array(["bob", "alice", "carol"] * 4)

    def _csv(self, name="t.csv", header="writer,f0,f1,f2,label"):
        lines = [header] + [
            f"{w},{a},{b},{c},{lab}" for w, (a, b, c), lab in zip(self.ids, self.x, self.y)
        ]
        path = self.dir / name
        path.write_text("\n".join(lines) + "\n")
        return path

    def _check(self, fd):
        self.assertEqual(fd.client_names, ("alice", "bob", "carol"))
        np.testing.assert_array_equal(fd.counts, [4, 4, 4])
        for k, name in enumerate(fd.client_names):
            xk, yk = fd.client(k)
            np.testing.assert_allclose(xk, self.x[self.ids == name], rtol=1e-6)
            np.testing.assert_array_equal(yk, self.y[self.ids == name])

    def test_csv_round_trip(self):
        fd = sources.from_table(self._csv(), client_column="writer", label_column="label")
        self._check(fd)
        self.assertEqual(fd.feature_shape, (3,))

    def test_csv_feature_columns_and_quotes(self):
        path = self._csv(header='"writer","f0","f1","f2","label"')
        fd = sources.from_table(
            path, client_column="writer", label_column="label", feature_columns=["f2", "f0"]
        )
        xk, _ = fd.client(0)
        np.testing.assert_allclose(xk, self.x[self.ids == "alice"][:, [2, 0]], rtol=1e-6)

    def test_npz_dict_and_structured(self):
        path = self.dir / "t.npz"
        np.savez(path, x=self.x, label=self.y, writer=self.ids)
        self._check(sources.from_table(path, client_column="writer", label_column="label"))
        columns = {"writer": self.ids, "label": self.y, "x": self.x}
        self._check(sources.from_table(columns, client_column="writer", label_column="label"))
        table = np.zeros(12, dtype=[("writer", "U8"), ("x", "f8", (3,)), ("label", "i4")])
        table["writer"], table["x"], table["label"] = self.ids, self.x, self.y
        self._check(sources.from_table(table, client_column="writer", label_column="label"))

    def test_image_column_keeps_shape(self):
        images = np.random.default_rng(1).random((12, 4, 4, 1))
        fd = sources.from_table(
            {"img": images, "y": self.y, "c": self.ids}, client_column="c", label_column="y"
        )
        self.assertEqual(fd.feature_shape, (4, 4, 1))

    def test_table_errors(self):
        with self.assertRaisesRegex(ValueError, r"t.csv has no column 'user'.*\['writer'"):
            sources.from_table(self._csv(), client_column="user", label_column="label")
        with self.assertRaisesRegex(ValueError, "no feature column"):
            sources.from_table({"c": self.ids, "y": self.y}, client_column="c", label_column="y")
        with self.assertRaisesRegex(ValueError, "feature column 'name' is not numeric"):
            sources.from_table(
                {"c": self.ids, "y": self.y, "name": self.ids}, client_column="c", label_column="y"
            )
        with self.assertRaisesRegex(ValueError, "column 'x' has"):
            sources.from_table(
                {"c": self.ids, "y": self.y, "x": self.x[:5]}, client_column="c", label_column="y"
            )
        with self.assertRaises(FileNotFoundError):
            sources.from_table(self.dir / "missing.csv", client_column="c", label_column="y")
        bad = self.dir / "ragged.csv"
        bad.write_text("c,a,y\nu,1,0\nv,2\n")
        with self.assertRaisesRegex(ValueError, "ragged.csv"):
            sources.from_table(bad, client_column="c", label_column="y")
        with self.assertRaisesRegex(ValueError, "t.csv.*label"):
            sources.from_table(self._csv(), client_column="writer", label_column="f0")


class FolderTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.dir = _tempdir(self)
        rng = np.random.default_rng(0)
        self.clients = {
            name: (rng.random((n, 2, 3)), rng.integers(0, 5, n))
            for name, n in (("u1", 3), ("u2", 5), ("zed", 1))
        }

    def _write(self, folder, fmt="npz"):
        folder.mkdir(exist_ok=True)
        for name, (x, y) in self.clients.items():
            if fmt == "npz":
                np.savez(folder / f"{name}.npz", x=x, y=y)
            else:
                flat = x.reshape(len(x), -1)
                rows = [",".join(f"f{j}" for j in range(flat.shape[1])) + ",y"]
                rows += [",".join(map(str, r)) + f",{lab}" for r, lab in zip(flat, y)]
                (folder / f"{name}.csv").write_text("\n".join(rows) + "\n")
        (folder / "README.txt").write_text("ignored")

    @parameterized.parameters("npz", "csv")
    def test_round_trip(self, fmt):
        self._write(self.dir / "clients", fmt)
        fd = sources.from_folder(self.dir / "clients")
        self.assertEqual(fd.client_names, ("u1", "u2", "zed"))
        np.testing.assert_array_equal(fd.counts, [3, 5, 1])
        for k, name in enumerate(fd.client_names):
            xk, yk = fd.client(k)
            x, y = self.clients[name]
            want = x if fmt == "npz" else x.reshape(len(x), -1)
            np.testing.assert_allclose(xk, want, rtol=1e-6)
            np.testing.assert_array_equal(yk, y)

    def test_errors(self):
        with self.assertRaisesRegex(FileNotFoundError, "not found"):
            sources.from_folder(self.dir / "nope")
        empty = self.dir / "empty"
        empty.mkdir()
        (empty / "notes.txt").write_text("x")
        with self.assertRaisesRegex(ValueError, "holds no .csv or .npz file"):
            sources.from_folder(empty)
        self._write(self.dir / "c")
        np.savez(self.dir / "c" / "odd.npz", x=np.zeros((2, 3, 2)), y=np.zeros(2, int))
        with self.assertRaisesRegex(ValueError, r"odd.npz has examples of shape \(3, 2\).*u1.npz"):
            sources.from_folder(self.dir / "c")
        (self.dir / "c" / "odd.npz").unlink()
        np.savez(self.dir / "c" / "nolabel.npz", x=np.zeros((2, 2, 3)))
        with self.assertRaisesRegex(ValueError, "nolabel.npz has no column 'y'"):
            sources.from_folder(self.dir / "c")
        (self.dir / "c" / "nolabel.npz").unlink()
        np.savez(self.dir / "c" / "u1x.npz", x=np.zeros((0, 2, 3)), y=np.zeros(0, int))
        with self.assertRaisesRegex(ValueError, "u1x.npz has no examples"):
            sources.from_folder(self.dir / "c")
        (self.dir / "c" / "u1x.npz").unlink()
        np.savez(self.dir / "c" / "half.npz", x=np.zeros((1, 2, 3)), y=np.array([0.5]))
        with self.assertRaisesRegex(ValueError, "half.npz: column 'y' must hold integer"):
            sources.from_folder(self.dir / "c")
        np.savez(self.dir / "c" / "half.npz", x=np.full((1, 2, 3), np.nan), y=np.array([1]))
        with self.assertRaisesRegex(ValueError, "half.npz contains non-finite"):
            sources.from_folder(self.dir / "c")
        (self.dir / "c" / "half.npz").unlink()
        (self.dir / "c" / "u1.csv").write_text("a,y\n1,0\n")
        with self.assertRaisesRegex(ValueError, "u1.*more than one file"):
            sources.from_folder(self.dir / "c")


class ExperimentUserDataTest(absltest.TestCase):
    def test_csv_and_folder_sources(self):
        d = _tempdir(self)
        rng = np.random.default_rng(0)
        rows = ["client_id,a,b,y"] + [
            f"c{i % 5},{rng.normal():.3f},{rng.normal():.3f},{i % 3}" for i in range(200)
        ]
        (d / "train.csv").write_text("\n".join(rows) + "\n")
        (d / "test.csv").write_text("\n".join(rows[:21]) + "\n")
        cfg = experiment.load_config(
            overrides={"data.source": "csv", "data.path": str(d / "train.csv")}
        )
        train, (xt, yt) = experiment.load_data(cfg)
        self.assertEqual(train.num_clients, 5)
        self.assertEqual(train.num_examples + len(yt), 200)  # random test_fraction holdout
        self.assertGreater(len(yt), 10)
        cfg = experiment.load_config(
            overrides={
                "data.source": "csv",
                "data.path": str(d / "train.csv"),
                "data.test_path": str(d / "test.csv"),
            }
        )
        train, (xt, yt) = experiment.load_data(cfg)
        self.assertEqual(train.num_examples, 200)
        self.assertEqual(xt.shape, (20, 2))

        folder = d / "clients"
        folder.mkdir()
        for k in range(4):
            np.savez(folder / f"user{k}.npz", x=rng.random((10, 3)), y=np.arange(10) % 2)
        cfg = experiment.load_config(
            overrides={"data.source": "folder", "data.path": str(folder), "data.test_fraction": 0.1}
        )
        train, (xt, _) = experiment.load_data(cfg)
        self.assertEqual(set(train.client_names) <= {f"user{k}" for k in range(4)}, True)
        self.assertEqual(train.num_examples + len(xt), 40)

    def test_missing_path(self):
        cfg = experiment.load_config(overrides={"data.source": "folder"})
        with self.assertRaisesRegex(ValueError, "data.path"):
            experiment.load_data(cfg)
        cfg = experiment.load_config(overrides={"data.source": "nope"})
        with self.assertRaisesRegex(ValueError, "fedprox_synthetic.*csv.*folder"):
            experiment.load_data(cfg)


if __name__ == "__main__":
    absltest.main()
