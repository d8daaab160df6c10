"""Experiments: configuration files, the host loop over rounds, metrics and outputs.

The host loop runs over ROUNDS only (:func:`fedjax_dp.runner.loop.train_loop`); everything
inside a round is one jitted call. Round metrics stay on device until the next evaluation
point or checkpoint, so rounds are dispatched without a host sync in between.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import time
import types
import typing
import warnings
from typing import Any

import jax
import numpy as np
import tomllib

from fedjax_dp import data as data_lib
from fedjax_dp import models as models_lib
from fedjax_dp import privacy as privacy_lib
from fedjax_dp.core.algorithms import AlgorithmConfig, build_simulation
from fedjax_dp.core.evaluation import evaluate
from fedjax_dp.data import sources as sources_lib
from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import membership as attacks_lib
from fedjax_dp.runner import checkpointing
from fedjax_dp.runner import loop as loop_lib


def _field(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help}, **kw
        )
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


@dataclasses.dataclass
class RunConfig:
    seed: int = _field(0, "root seed: data partition, initialisation, sampling and noise")
    rounds: int = _field(100, "number of federated rounds")
    eval_every: int = _field(10, "evaluate on held-out data every k rounds (and after the last)")
    output_dir: str = _field("runs/default", "where metrics.jsonl, params.npz, summary.json go")
    progress: bool = _field(True, "show a progress bar (round, accuracy, epsilon, rounds/s)")
    checkpoint_every: int = _field(
        50,
        "save a checkpoint (orbax) to output_dir/checkpoints every k rounds and after the last, "
        "so a killed run loses at most k rounds (0 = no checkpoints)",
    )
    resume: bool = _field(
        True,
        "continue from the latest checkpoint in output_dir if it is of this config (the same "
        "command resumes; false: start over, replacing output_dir's checkpoints)",
    )
    tensorboard: bool = _field(
        False,
        "also write the metrics to output_dir/tensorboard for TensorBoard "
        "(needs pip install 'fedjax_dp[tensorboard]')",
    )


@dataclasses.dataclass
class DataConfig:
    source: str = _field(
        "digits",
        "'digits' (scikit-learn's bundled digits, no download), "
        "'tfds' (TensorFlow Datasets data.name, partitioned), "
        "'fedprox_synthetic' (FedProx Synthetic(alpha, beta), devices = clients), "
        "'npz' (a file with arrays x, y, client_ids; optional x_test, y_test), "
        "'csv' (a table with a client-id column) or "
        "'folder' (one .csv/.npz file per client, named after the client)",
    )
    path: str = _field(
        "", "the .npz file (source='npz'), .csv/.npz table ('csv') or folder ('folder')"
    )
    num_clients: int = _field(100, "number of clients to partition digits or TFDS data into")
    partition: str = _field("dirichlet", "iid | dirichlet | shards | quantity_skew")
    alpha: float = _field(
        0.5,
        "Dirichlet concentration (smaller = more label skew); for source='fedprox_synthetic' "
        "the spread (std) of the devices' models",
    )
    beta: float = _field(
        0.5, "source='fedprox_synthetic': the spread (std) of the devices' input means"
    )
    num_devices: int = _field(30, "source='fedprox_synthetic': number of devices (clients)")
    synthetic_iid: bool = _field(
        False, "source='fedprox_synthetic': the IID variant (one model, same inputs everywhere)"
    )
    name: str = _field(
        "mnist", "source='tfds': mnist | fashion_mnist | cifar10 | emnist (or emnist/<config>)"
    )
    data_dir: str = _field(
        "",
        "source='tfds': folder of TFDS data prepared as array_record (empty: TFDS's default, "
        "~/tensorflow_datasets)",
    )
    split: str = _field("train", "source='tfds': split for the clients, e.g. train[:10%]")
    test_split: str = _field("test", "source='tfds': split for evaluation")
    download: bool = _field(True, "source='tfds': download and prepare the data if missing")
    client_column: str = _field("client_id", "source='csv': the client-id column")
    label_column: str = _field("y", "source='csv'/'folder': the label column (or .npz array)")
    test_path: str = _field(
        "",
        "source='csv'/'folder': held-out table or folder in the same format (empty: hold out "
        "test_fraction of the examples at random)",
    )
    shards_per_client: int = _field(2, "label shards per client for partition='shards'")
    sigma: float = _field(1.0, "log-normal sigma of client sizes for partition='quantity_skew'")
    test_fraction: float = _field(0.2, "held-out fraction for evaluation")
    input_shape: list = _field([], "reshape each example to this shape, e.g. [8, 8, 1] for 'cnn'")  # noqa: RUF009
    partition_seed: int | None = _field(
        None,
        "seed of the data: train/test split, client partition, synthetic data (unset: "
        "run.seed); fix it to vary run.seed (initialisation, sampling, noise) on the same data",
    )


@dataclasses.dataclass
class ModelConfig:
    name: str = _field("mlp", "mlp | logistic | cnn")
    hidden: list = _field([64], "hidden layer widths for 'mlp'")  # noqa: RUF009
    channels: list = _field([16, 32], "conv channels for 'cnn'")  # noqa: RUF009


_ALGO_HELP = {
    "name": "fedavg | fedsgd | dp_fedavg | dp_sgd_fedavg | fedadam | fedyogi | fedadagrad | "
    "fedprox | scaffold",
    "sampling": "cohort sampling: 'fixed' (cohort_size clients), 'poisson' (rate "
    "sampling_rate) or 'shuffle' (epochs of disjoint cohorts of cohort_size; non-DP runs)",
    "cohort_size": "clients per round for sampling='fixed' or 'shuffle'",
    "sampling_rate": "inclusion probability q for sampling='poisson'",
    "local_epochs": "passes over each client's data per round",
    "local_steps": "fixed local steps instead of local_epochs (set local_epochs to 0)",
    "batch_size": "local batch size (0 = whole client dataset)",
    "client_optimizer": "any optax optimizer name, e.g. sgd, adam",
    "client_lr": "client learning rate (traced: changing it does not recompile)",
    "server_optimizer": "optax optimizer on the pseudo-gradient: sgd (FedAvg), adam, yogi, adagrad",
    "server_lr": "server learning rate (1.0 with sgd is plain FedAvg)",
    "weighting": "aggregation weights: uniform | num_examples (non-DP only)",
    "clip_norm": "user-level DP: clip norm of each client's delta (L2; L1 for mechanism=laplace; "
    "the initial clip norm with adaptive_clipping, default 0.1)",
    "noise_multiplier": "user-level DP: noise std / clip_norm on the summed deltas",
    "example_clip_norm": "example-level DP-SGD: per-example gradient clip norm",
    "example_noise_multiplier": "example-level DP-SGD: noise std / example_clip_norm per step",
    "chunk_size": "clients vmapped together; chunks run in sequence (0 = auto from the budget)",
    "memory_budget_mb": "working memory for the auto chunk size (0 = 16 MiB on CPU, 1/4 of GPU)",
    "clipping": "DP-SGD per-example clipping: auto | ghost (fast, Flax Dense/Conv) | per_example",
    "mechanism": "user-level DP mechanism: gaussian (central noise on the sum) | laplace (L1 clip, "
    "Laplace scale noise_multiplier*clip_norm, pure 1/noise_multiplier-DP per round) | "
    "local_gaussian (each client noises its own clipped update: local DP)",
    "adaptive_clipping": "user-level DP: adapt the clip norm each round toward target_quantile "
    "of the update norms (Andrew et al. 2021; clip norm starts at clip_norm, default 0.1)",
    "target_quantile": "adaptive clipping: the quantile of update norms to clip at (default 0.5)",
    "clip_lr": "adaptive clipping: geometric learning rate of the clip norm (default 0.2)",
    "clipped_count_stddev": "adaptive clipping: noise std on the clipped count (default 0.05 x "
    "expected cohort); must exceed noise_multiplier / 2",
    "layer_clip_norms": "user-level DP: a clip norm per parameter group instead of clip_norm, e.g. "
    "'Dense_0=0.5, Dense_1=1.0' (regex on whole path components; noise uses sqrt(sum C_g^2))",
    "mu": "fedprox: weight of the proximal term mu/2 |w - w_global|^2 (traced; default 0.01)",
    "control_clip_norm": "scaffold with user-level DP: clip norm of each control-variate upload "
    "(default clip_norm)",
    "control_noise_multiplier": "scaffold with user-level DP: noise multiplier on the summed "
    "control variates (default noise_multiplier; accounted with the deltas as one release)",
    "straggler_fraction": "probability that a client straggles: it runs 1..E-1 local epochs "
    "(uniform) instead of E",
    "straggler_policy": "drop (stragglers' uploads are dropped: FedAvg) | partial (their partial "
    "work is aggregated: the default of fedprox)",
    "dropout_rate": "probability that a client's upload is lost after training",
    "min_clients": "skip (and report) a round with fewer uploads than this (0 = never)",
}


@dataclasses.dataclass
class PrivacyConfig:
    delta: float = _field(1e-5, "target delta for the reported epsilon (well below 1/population)")
    accountant: str = _field("rdp", "rdp | pld (dp-accounting)")
    conversion: str = _field("improved", "RDP to (eps, delta): improved | classic")
    target_epsilon: float = _field(
        0.0,
        "calibrate the noise multiplier before training so that epsilon at delta after "
        "run.rounds rounds is at most this (0 = off: use the algorithm's noise multiplier)",
    )
    noise_schedule: str = _field(
        "constant",
        "how the noise multiplier changes from the first round to the last: constant | linear | "
        "geometric (accounted as a heterogeneous composition)",
    )
    noise_end_ratio: float = _field(
        1.0,
        "last round's noise multiplier / first round's, for a linear or geometric "
        "noise_schedule (< 1: the noise decays)",
    )
    noise_schedule_stages: int = _field(
        10,
        "distinct noise multipliers of a linear or geometric schedule, each held for an equal "
        "block of rounds (0 = a new value every round: slower to account and calibrate)",
    )
    noise_cohort_size: int = _field(
        0,
        "noise-cohort trick (user-level DP): scale the noise so that the noise on the mean "
        "matches a deployment with this expected cohort size; epsilon is then the "
        "deployment's, not the simulated run's (0 = off)",
    )
    noise_population: int = _field(
        0,
        "the deployment's population for noise_cohort_size (0 = the simulated population "
        "scaled by noise_cohort_size / expected cohort, keeping the sampling rate)",
    )
    attack: bool = _field(
        False,
        "membership-inference risk: hold out attack_holdout of the clients from training, "
        "then attack held-in vs held-out clients by their loss (AUC, TPR at 1% and 0.1% FPR)",
    )
    attack_holdout: float = _field(0.2, "fraction of clients held out for privacy.attack")


@dataclasses.dataclass
class AuditConfig:
    canaries: int = _field(
        1000, "fedjax-dp audit: canary clients inserted, each included with probability 1/2"
    )
    significance: float = _field(
        0.05, "fedjax-dp audit: the lower bound holds with probability 1 - significance"
    )
    noise_multipliers: str = _field(
        "",
        "fedjax-dp audit: comma-separated noise multipliers audited in turn, e.g. 0,0.5,1,2 "
        "(empty: the algorithm's)",
    )
    fault: str = _field(
        "none",
        "fedjax-dp audit: simulate a broken run to check that the audit catches it: none | "
        "noise_div_10 | no_clipping (the accountant still claims the configured run)",
    )
    output: str = _field("", "fedjax-dp audit: results JSON (empty: run.output_dir/audit.json)")


@dataclasses.dataclass
class SweepConfig:
    noise_multipliers: list[float] = _field(  # noqa: RUF009
        [],
        "fedjax-dp sweep: noise multipliers of the run's DP mechanism (user- or example-level), "
        "e.g. [0.3, 0.5, 1, 2] (empty: the algorithm's)",
    )
    seeds: list[int] = _field(  # noqa: RUF009
        [],
        "fedjax-dp sweep: run.seed values (initialisation, sampling, noise; the data stay "
        "those of data.partition_seed, else run.seed), e.g. [0, 1, 2] (empty: [run.seed])",
    )
    clip_norms: list[float] = _field(  # noqa: RUF009
        [], "fedjax-dp sweep: clip norms of the DP mechanism (empty: the algorithm's)"
    )
    client_lrs: list[float] = _field(  # noqa: RUF009
        [], "fedjax-dp sweep: client learning rates (empty: algorithm.client_lr)"
    )
    server_lrs: list[float] = _field(  # noqa: RUF009
        [], "fedjax-dp sweep: server learning rates (empty: algorithm.server_lr)"
    )
    baseline: bool = _field(
        True,
        "fedjax-dp sweep: also run the non-private baseline (the same algorithm with noise "
        "multiplier 0 and clip norm 1e15, i.e. no clipping) for every seed and learning rates",
    )
    vectorize: bool = _field(
        True,
        "fedjax-dp sweep: run the grid as one vmapped simulation (false: the points one after "
        "another with the same compiled round)",
    )
    parallel: int = _field(
        0,
        "fedjax-dp sweep: at most this many points per vmapped group, groups run one after "
        "another, to bound memory (0: all points in one group)",
    )
    output: str = _field("", "fedjax-dp sweep: output folder (empty: run.output_dir/sweep)")
    grid: str = _field(
        "",
        "fedjax-dp sweep: more axes over any hyper-parameter the run declares (`fedjax-dp "
        "hparams CONFIG` lists them), 'name=v1,v2; name2=v1,v2', e.g. 'mu=0,0.01,1'",
    )


@dataclasses.dataclass
class ExperimentConfig:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
    audit: AuditConfig = dataclasses.field(default_factory=AuditConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)


SECTIONS = ("run", "data", "model", "algorithm", "privacy", "audit", "sweep")


def option_help(section: str, name: str) -> str:
    if section == "algorithm":
        return _ALGO_HELP.get(name, "")
    cls = type(getattr(ExperimentConfig(), section))
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[name]


def option_type(section: str, name: str) -> Any:
    """The Python type of a config option (``int``, ``float``, ``str``, ``bool``, ``list``)."""
    cls = type(getattr(ExperimentConfig(), section))
    hints = typing.get_type_hints(cls)
    t = hints[name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return typing.get_origin(t) or t


def _list_item_type(section: str, name: str) -> type:
    """The item type of a list option: ``float`` for ``list[float]``, else ``int``."""
    cls = type(getattr(ExperimentConfig(), section))
    args = typing.get_args(typing.get_type_hints(cls)[name])
    return float if args == (float,) else int


def load_config(
    path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None
) -> ExperimentConfig:
    """Reads a TOML or YAML experiment file; ``overrides`` (``"section.option" -> value``) win.

    Raises:
      ValueError: unknown section or option (the message lists the valid ones), or a value
        of the wrong type.
      FileNotFoundError: the file does not exist.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = pathlib.Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} not found")
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif p.suffix == ".toml":
            try:
                raw = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{p}: invalid TOML: {e}") from None
        else:
            raise ValueError(f"config {str(p)!r} must end in .toml, .yaml or .yml")
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: expected sections {list(SECTIONS)} at the top level")
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    cfg = ExperimentConfig()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ValueError(
                f"unknown config section [{section}]; valid sections: {list(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ValueError(f"config section [{section}] must be a table of options")  # noqa: TRY004
        sub = getattr(cfg, section)
        valid = [f.name for f in dataclasses.fields(sub)]
        for name, value in values.items():
            if name not in valid:
                raise ValueError(
                    f"unknown option {section}.{name}; valid options of [{section}]: {valid}"
                )
            value = _coerce(section, name, value)
            sub = dataclasses.replace(sub, **{name: value})
        setattr(cfg, section, sub)
    return cfg


def _coerce(section: str, name: str, value: Any) -> Any:
    t = option_type(section, name)
    where = f"{section}.{name}={value!r}"
    if t is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false")
    if t is list:
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, e.g. [64, 64]")
        item = _list_item_type(section, name)
        try:
            if item is float:
                return [float(v) for v in value]
            if any(isinstance(v, float) and not v.is_integer() for v in value):
                raise ValueError
            return [int(v) for v in value]
        except (TypeError, ValueError):
            kind = "numbers" if item is float else "integers"
            raise ValueError(f"{where} must be a list of {kind}") from None
    if value is None:
        return None
    try:
        if t is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if t is float:
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a{'n integer' if t is int else ' number'}") from None
    return str(value) if t is str else value


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- data & model


def data_seed(cfg: ExperimentConfig) -> int:
    """The seed of the data (split, partition): ``data.partition_seed``, else ``run.seed``."""
    return cfg.run.seed if cfg.data.partition_seed is None else cfg.data.partition_seed


def load_data(cfg: ExperimentConfig):
    """Returns ``(train FederatedData, (x_test, y_test))`` for ``cfg.data``.

    The train/test split, the client partition and synthetic data are drawn with
    :func:`data_seed` (``data.partition_seed``, else ``run.seed``).
    """
    d = cfg.data
    seed = data_seed(cfg)
    num_classes = None
    if d.source in ("digits", "tfds"):
        if d.source == "digits":
            (x, y), (x_test, y_test) = data_lib.load_digits(
                test_fraction=d.test_fraction, seed=seed
            )
        else:
            (x, y), (x_test, y_test) = sources_lib.load_tfds(
                d.name,
                data_dir=d.data_dir,
                split=d.split,
                test_split=d.test_split,
                download=d.download,
            )
        client_ids = data_lib.partition(
            y,
            num_clients=d.num_clients,
            method=d.partition,
            seed=seed,
            alpha=d.alpha,
            shards_per_client=d.shards_per_client,
            sigma=d.sigma,
        )
    elif d.source == "npz":
        if not d.path:
            raise ValueError("data.source='npz' needs data.path, a .npz file with x, y, client_ids")
        if not pathlib.Path(d.path).is_file():
            raise FileNotFoundError(f"data.path={d.path!r} not found")
        arrays = np.load(d.path)
        missing = {"x", "y", "client_ids"} - set(arrays.files)
        if missing:
            raise ValueError(f"data.path={d.path!r} lacks arrays {sorted(missing)}")
        x, y, client_ids = arrays["x"], arrays["y"], arrays["client_ids"]
        if "x_test" in arrays.files and "y_test" in arrays.files:
            x_test, y_test = arrays["x_test"], arrays["y_test"]
        else:
            rng = np.random.default_rng(seed)
            test = rng.random(len(y)) < d.test_fraction
            x_test, y_test = x[test], y[test]
            x, y, client_ids = x[~test], y[~test], client_ids[~test]
    elif d.source == "fedprox_synthetic":
        synthetic = sources_lib.fedprox_synthetic(
            d.alpha, d.beta, num_devices=d.num_devices, iid=d.synthetic_iid, seed=seed
        )
        train, test = synthetic.train, synthetic.test
        x, y = train.x, train.y
        client_ids = np.repeat(np.arange(train.num_clients), train.counts)
        x_test, y_test = test.x, test.y  # the union of the devices' test sets
        num_classes = train.num_classes
    elif d.source in ("csv", "folder"):
        x, y, client_ids, x_test, y_test = _load_user_clients(d, seed)
    else:
        raise ValueError(
            f"data.source={d.source!r} must be one of 'digits', 'tfds', 'fedprox_synthetic', "
            "'npz', 'csv', 'folder'"
        )
    if d.input_shape:
        shape = tuple(d.input_shape)
        if math.prod(shape) != math.prod(x.shape[1:]):
            raise ValueError(
                f"data.input_shape={list(shape)} does not fit examples of {math.prod(x.shape[1:])} "
                "values"
            )
        x = np.reshape(x, (len(x),) + shape)
        x_test = np.reshape(x_test, (len(x_test),) + shape)
    if num_classes is None and len(y_test):
        num_classes = int(max(np.max(y), np.max(y_test))) + 1
    train = data_lib.from_arrays(x, y, client_ids, num_classes=num_classes)
    return train, (np.asarray(x_test, np.float32), np.asarray(y_test, np.int32))


def _load_user_clients(d: DataConfig, seed: int):
    """``(x, y, client_ids, x_test, y_test)`` for ``source='csv'`` or ``'folder'``."""
    if not d.path:
        raise ValueError(
            f"data.source={d.source!r} needs data.path, "
            + ("a .csv/.npz table" if d.source == "csv" else "a folder of per-client files")
        )

    def load(path):
        if d.source == "csv":
            return sources_lib.from_table(
                path, client_column=d.client_column, label_column=d.label_column
            )
        return sources_lib.from_folder(path, label_column=d.label_column)

    train = load(d.path)
    x, y = train.x, train.y
    client_ids = np.repeat(np.asarray(train.client_names), train.counts)
    if d.test_path:
        test = load(d.test_path)
        x_test, y_test = test.x, test.y
    else:
        test = np.random.default_rng(seed).random(len(y)) < d.test_fraction
        x_test, y_test = x[test], y[test]
        x, y, client_ids = x[~test], y[~test], client_ids[~test]
    return x, y, client_ids, x_test, y_test


def make_model(cfg: ExperimentConfig, feature_shape, num_classes) -> models_lib.Model:
    m = cfg.model
    kwargs = {"mlp": {"hidden": m.hidden}, "cnn": {"channels": m.channels}}.get(m.name, {})
    return models_lib.get_model(m.name, feature_shape, num_classes, **kwargs)


def algorithm_config(cfg: ExperimentConfig) -> AlgorithmConfig:
    """The algorithm section with the CLI's 0-means-unset conventions applied."""
    a = cfg.algorithm
    return dataclasses.replace(
        a,
        local_epochs=a.local_epochs or None,
        local_steps=a.local_steps or None,
        batch_size=a.batch_size or None,
        chunk_size=a.chunk_size or None,
        memory_budget_mb=a.memory_budget_mb or None,
    )


def describe_hparams(cfg: ExperimentConfig, *, log=print) -> str:
    """``fedjax-dp hparams``: the traced hyper-parameters of the config's round.

    Builds the run's simulation (no training) and logs the table of every hyper-parameter
    its stages declare (name, the value the run uses, domain, help): the names that
    ``sweep.grid`` accepts and ``Simulation.make_hparams`` overrides, none of which
    recompiles the round.
    """
    _check(cfg)
    train, _ = load_data(cfg)
    train, _ = attack_split(cfg, train)
    model = make_model(cfg, train.feature_shape, train.num_classes)
    sim = build_simulation(algorithm_config(cfg), model, train)
    table = sim.hparams_table()
    log(f"{sim.config.name}: the round's traced hyper-parameters (sweep.grid takes any of them)")
    log(table)
    return table


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class RunResult:
    """What :func:`run` returns.

    Attributes:
      params: the final parameters.
      final: ``summary.json``.
      history: the rows of ``metrics.jsonl``.
      output_dir: where the files went (``None`` with ``write=False``).
      schedules: per accountant label, the rounds it composed (``(RoundPrivacy, count)``
        pairs; empty without DP), e.g. to compose this run with others on the same data
        (:func:`composed_epsilon`).
    """

    params: Any
    final: dict[str, float]
    history: list[dict[str, Any]]
    output_dir: pathlib.Path | None
    schedules: dict[str, tuple[tuple[accounting.RoundPrivacy, int], ...]] = dataclasses.field(
        default_factory=dict
    )


def _check(cfg: ExperimentConfig) -> None:
    r, p = cfg.run, cfg.privacy
    if r.rounds < 1:
        raise ValueError(f"run.rounds={r.rounds} must be >= 1")
    if r.eval_every < 1:
        raise ValueError(f"run.eval_every={r.eval_every} must be >= 1")
    if r.checkpoint_every < 0:
        raise ValueError(
            f"run.checkpoint_every={r.checkpoint_every} must be >= 0: rounds between "
            "checkpoints, e.g. 50 (0 = no checkpoints)"
        )
    if not (0.0 < p.delta < 1.0):  # also rejects NaN
        raise ValueError(f"privacy.delta={p.delta} must be in (0, 1), e.g. 1e-5")
    if not 0.0 <= p.target_epsilon < math.inf:  # also rejects NaN
        raise ValueError(
            f"privacy.target_epsilon={p.target_epsilon} must be a finite number > 0 (0 = off)"
        )
    if p.noise_schedule not in accounting.SCHEDULE_KINDS:
        raise ValueError(
            f"privacy.noise_schedule={p.noise_schedule!r} must be one of "
            f"{list(accounting.SCHEDULE_KINDS)}"
        )
    if not 0.0 < p.noise_end_ratio < math.inf:
        raise ValueError(f"privacy.noise_end_ratio={p.noise_end_ratio} must be finite and > 0")
    if p.noise_schedule == "constant" and p.noise_end_ratio != 1.0:
        raise ValueError(
            f"privacy.noise_end_ratio={p.noise_end_ratio} needs privacy.noise_schedule = "
            "'linear' or 'geometric' (it is 'constant')"
        )
    for name in ("noise_schedule_stages", "noise_cohort_size", "noise_population"):
        if getattr(p, name) < 0:
            raise ValueError(f"privacy.{name}={getattr(p, name)} must be >= 0 (0 = default/off)")
    if p.noise_population and not p.noise_cohort_size:
        raise ValueError(
            f"privacy.noise_population={p.noise_population} needs privacy.noise_cohort_size"
        )


def warn_delta(delta: float, num_clients: int) -> None:
    """Warns when delta is not below 1/population (it would allow leaking a whole client)."""
    if delta >= 1.0 / num_clients:
        warnings.warn(
            f"privacy.delta={delta} is not below 1/population "
            f"({1.0 / num_clients:.3g}); choose a smaller delta",
            stacklevel=3,
        )


def warn_overflow(total: int, what: str, where: str) -> None:
    """Warns when Poisson sampling selected more clients than the static cohort holds."""
    if total:
        warnings.warn(
            f"Poisson sampling selected {total} clients more than the static cohort size "
            f"over {what}; they were left out (see {where})",
            stacklevel=3,
        )


def run(
    cfg: ExperimentConfig,
    *,
    write: bool = True,
    log=print,
    callbacks: typing.Sequence[loop_lib.Callback] = (),
) -> RunResult:
    """Runs the experiment: trains, evaluates every ``eval_every`` rounds, accounts privacy.

    Writes to ``cfg.run.output_dir``: ``config.json``, ``metrics.jsonl`` (one JSON object per
    round; evaluation points add ``test_loss``, ``test_accuracy`` and ``elapsed_s``),
    ``params.npz`` (final parameters, flattened by path) and ``summary.json``; with
    ``run.tensorboard`` also TensorBoard events. With ``privacy.attack`` a fraction of the
    clients is held out of training and the final model is attacked (:func:`attack_metrics`:
    ``attack_*`` entries of the summary, attack AUC on the final log line).

    Every ``run.checkpoint_every`` rounds and after the last it saves a checkpoint to
    ``output_dir/checkpoints`` (state, accountants, RNG position, metrics so far). With
    ``run.resume`` a run whose output folder holds a checkpoint of the same config continues
    from it and ends with the same parameters, metrics and epsilon as a run never stopped;
    the first Ctrl-C checkpoints the last completed round and stops (with
    ``run.checkpoint_every > 0``, on the main thread; see docs/long_runs.md).

    The rounds run in :func:`fedjax_dp.runner.loop.train_loop`; ``callbacks`` (of
    :class:`fedjax_dp.runner.loop.Callback`) are called after the built-in ones (metrics rows,
    evaluation, files, progress bar, checkpoints), e.g. to log or stop on what they see.
    """
    _check(cfg)
    out_dir = pathlib.Path(cfg.run.output_dir) if write else None
    writer_cls = _summary_writer_cls() if write and cfg.run.tensorboard else None
    train, (x_test, y_test) = load_data(cfg)
    train, held_out = attack_split(cfg, train)
    model = make_model(cfg, train.feature_shape, train.num_classes)
    sim = build_simulation(algorithm_config(cfg), model, train)
    # After every option is validated: bad input is reported as such, not as a config change.
    resume_round = _resume_round(cfg, out_dir)
    hparams = sim.make_hparams()
    privacy = sim.round_privacy({k: float(v) for k, v in hparams.items()})
    if privacy:
        warn_delta(cfg.privacy.delta, train.num_clients)
    desc = (
        f"{sim.config.name} on {train.num_clients} clients "
        f"({sim.sampler.sampling} cohort ~{sim.sampler.expected_cohort_size:g})"
    )
    log(desc)
    for rp in privacy:
        log(
            f"  privacy: {rp.unit}-level, noise multiplier {rp.noise_multiplier:g}, "
            f"delta {cfg.privacy.delta:g}, accountant {cfg.privacy.accountant}, neighbouring "
            f"relation {rp.neighboring_relation}"
        )
    releases = [
        r
        for r in sim.releases({k: float(v) for k, v in hparams.items()})
        if r.unit == "user" and r.mechanism == "gaussian"
    ]
    if len(releases) > 1:
        parts = ", ".join(f"{r.upload} ({r.noise_hparam} {r.noise_multiplier:g})" for r in releases)
        log(
            f"  the user-level noise multiplier combines {len(releases)} releases over one "
            f"cohort, (sum sigma^-2)^-1/2 of {parts}"
        )
    if privacy:
        log(f"  {privacy_lib.RELEASED_IN_DP_RUNS}")
    # Calibration, noise schedule, noise-cohort trick: decided (and printed) before training.
    plan = privacy_lib.build_plan(cfg.privacy, sim, hparams, cfg.run.rounds, log)
    accountants = plan.accountants

    root = jax.random.key(cfg.run.seed)
    state = sim.init(jax.random.fold_in(root, 0))
    train_key = jax.random.fold_in(root, 1)  # round r uses fold_in(train_key, r)
    device_data = train.to_device()
    every = cfg.run.checkpoint_every if out_dir is not None else 0
    history: list[dict[str, Any]] = []
    start_round, elapsed_before = 0, 0.0
    ckpts = metrics_file = tb = progress = None
    try:
        if every or resume_round is not None:
            ckpts = checkpointing.Checkpointer(out_dir / checkpointing.CHECKPOINT_DIR)
        if resume_round is not None:
            restored = ckpts.restore(state, resume_round)
            _check_restored(restored, accountants, plan, train_key)
            state, history = restored.state, restored.history
            start_round, elapsed_before = restored.round, restored.elapsed_s
            log(
                f"resumed from round {start_round} of {cfg.run.rounds} "
                f"({out_dir / checkpointing.CHECKPOINT_DIR})"
                + (
                    ": this run is already complete, showing its results; to train again "
                    "pass --run.resume false or another --run.output_dir"
                    if start_round == cfg.run.rounds
                    else ""
                )
            )
        # A resumed run that is already complete may still owe its last row an evaluation.
        written = len(history) - int(
            start_round == cfg.run.rounds > 0 and "test_accuracy" not in history[-1]
        )
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
            # Rows a killed session wrote after its last checkpoint are cut (they are redone).
            checkpointing.rewrite_jsonl(out_dir / "metrics.jsonl", history[:written])
            metrics_file = open(out_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in finally
            if writer_cls is not None:
                # purge_step hides the events a killed or earlier session wrote after that row.
                tb = writer_cls(str(out_dir / "tensorboard"), purge_step=written + 1)
        overflow_total = 0  # internal: never written in DP runs
        # Rows since the last evaluation (their mean train loss is logged with it).
        since_eval = max((i + 1 for i, h in enumerate(history) if "test_accuracy" in h), default=0)
        progress = loop_lib.Progress(
            cfg.run.rounds,
            enabled=cfg.run.progress,
            initial=start_round,
            postfix_fn=lambda: _postfix(history, accountants),
        )
        start = time.perf_counter()

        def elapsed() -> float:
            return elapsed_before + time.perf_counter() - start

        def row_of(rnd: int, m: dict[str, Any]) -> dict[str, Any]:
            """Round ``rnd``'s metrics row from its fetched metrics ``m``."""
            nonlocal overflow_total
            overflow_total += int(m["cohort_overflow"])
            row = {"round": rnd}
            if not accountants:  # data-dependent values the accountant does not cover
                row.update(
                    train_loss=float(m["train_loss"]),
                    num_clients=int(m["num_clients"]),
                    cohort_overflow=int(m["cohort_overflow"]),
                )
            if "clip_norm" in m:  # adaptive clipping: the clip norm this round used
                row["clip_norm"] = float(m["clip_norm"])
            if "skipped" in m:  # min_clients: a skipped round is reported, never silent
                row["skipped"] = int(m["skipped"])
            if not accountants and sim.round.systems.active:
                row["num_uploads"] = int(m["num_uploads"])
            row.update(plan.compose(rnd - 1))  # epsilon and relation (DP runs)
            return row

        def evaluate_last(done: int, state) -> None:
            """Evaluates ``state`` into the last row (round ``done``) unless it was."""
            nonlocal since_eval
            if not history or "test_accuracy" in history[-1]:
                return
            row = history[-1]
            ev = evaluate(model, state.params, x_test, y_test)
            row.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"], elapsed_s=elapsed())
            msg = f"round {done:>5}/{cfg.run.rounds}  "
            if not accountants:
                train_loss = np.mean([h["train_loss"] for h in history[since_eval:]])
                msg += f"train loss {float(train_loss):.4f}  "
            since_eval = len(history)
            msg += f"test loss {ev['loss']:.4f}  accuracy {ev['accuracy']:.4f}"
            for unit in accountants:
                msg += f"  eps({unit}) {row[f'epsilon_{unit}']:.3f}"
            progress.write(msg)

        def save(done: int, state) -> None:
            """Checkpoints round ``done`` (all its rows fetched) unless it is on disk."""
            if done and ckpts.latest_round != done:
                ckpts.save(
                    done,
                    state,
                    history=history,
                    accountants={label: a.state_dict() for label, a in accountants.items()},
                    train_key=train_key,
                    config=to_dict(cfg),
                    elapsed_s=elapsed(),
                )

        def interrupted(done: int) -> None:
            log(
                f"interrupted after round {done} of {cfg.run.rounds}: checkpoint in "
                f"{out_dir / checkpointing.CHECKPOINT_DIR}; run the same command to resume"
            )

        # At a flush (an evaluation point, a checkpoint, the last round, a Ctrl-C) the
        # pending rounds' metrics become rows (one host sync), the last row is evaluated if
        # due, the new rows are written, the bar shows them, and a due checkpoint is saved.
        hooks: list[loop_lib.Callback] = [
            loop_lib.Metrics(row_of, rows=history),
            loop_lib.Evaluation(evaluate_last, every=cfg.run.eval_every),
            _RowWriter(history, written, metrics_file, tb),
            progress,
        ]
        if every:
            hooks.append(loop_lib.Checkpoints(save, every=every, on_interrupt=interrupted))
        hooks += callbacks  # the caller's, after the built-in ones

        def step(state, r: int):
            return sim.round_fn(
                state, device_data, plan.hparams_at(r), jax.random.fold_in(train_key, r)
            )

        state = loop_lib.train_loop(
            step,
            state,
            start=start_round,
            rounds=cfg.run.rounds,
            callbacks=hooks,
            stop_on_interrupt=bool(every),
        )
        total_s = elapsed()
    finally:
        for closable in (progress, metrics_file, tb, ckpts):
            if closable is not None:
                closable.close()
    if accountants:
        if overflow_total:
            # The count itself is data dependent: say only that the cap was hit.
            warnings.warn(
                "Poisson sampling selected more clients than the static cohort size in some "
                "round; the accounted epsilon assumes no truncation (raise the cohort cap)",
                stacklevel=2,
            )
    else:
        overflow_total = sum(h["cohort_overflow"] for h in history)
        warn_overflow(overflow_total, "the run", "cohort_overflow in metrics.jsonl")
    final = dict(history[-1])  # the last round is always an evaluation point
    final["rounds_per_s"] = cfg.run.rounds / max(total_s, 1e-9)
    if not accountants:
        final["cohort_overflow"] = overflow_total
    final.update(plan.summary)
    if accountants:  # what the epsilon covers, release by release (first round's values)
        final["releases"] = plan.describe_releases()
    if any("skipped" in h for h in history):
        final["skipped_rounds"] = sum(h.get("skipped", 0) for h in history)
        if final["skipped_rounds"]:
            log(
                f"{final['skipped_rounds']} of {cfg.run.rounds} rounds were skipped: fewer "
                f"uploads than algorithm.min_clients = {sim.config.min_clients}"
            )
    attack = ""
    if held_out is not None:
        final.update(attack_metrics(model, state.params, train, held_out))
        attack = f"  attack AUC {final['attack_auc']:.3f}"
    if accountants:
        final["released"] = privacy_lib.RELEASED_IN_DP_RUNS.removeprefix("released: ") + (
            "; the attack_* entries (privacy.attack) are computed from the training clients' "
            "data and are NOT covered by epsilon"
            if held_out is not None
            else ""
        )
    if out_dir is not None:
        save_params(out_dir / "params.npz", state.params)
        (out_dir / "summary.json").write_text(json.dumps(final, indent=2) + "\n")
    eps = "  ".join(
        f"epsilon ({u.replace('_', '-level, ')}{'' if '_' in u else '-level'}) = "
        f"{final[f'epsilon_{u}']:.3f}"
        for u in accountants
    )
    log(
        f"final accuracy {final['test_accuracy']:.4f}  test loss {final['test_loss']:.4f}"
        + (f"  {eps} at delta = {cfg.privacy.delta:g}" if accountants else "  (no DP)")
        + attack
    )
    if out_dir is not None:
        log(f"wrote {out_dir}/metrics.jsonl, params.npz, summary.json")
    schedules = {label: acct.schedule for label, acct in accountants.items()}
    return RunResult(state.params, final, history, out_dir, schedules)


def _resume_round(cfg: ExperimentConfig, out_dir: pathlib.Path | None) -> int | None:
    """The round of the checkpoint in ``out_dir`` to resume from, checked against ``cfg``
    (``None``: start over; then ``out_dir``'s old checkpoints are removed)."""
    if out_dir is None:
        return None
    directory = out_dir / checkpointing.CHECKPOINT_DIR
    if not directory.is_dir():
        return None
    if cfg.run.resume:
        ckpts = checkpointing.Checkpointer(directory)
        try:
            latest = ckpts.latest_round
            if latest is not None:
                checkpointing.check_resumable(
                    ckpts.read_meta(latest), to_dict(cfg), to_dict(ExperimentConfig())
                )
                return latest
        finally:
            ckpts.close()
    shutil.rmtree(directory)
    return None


def _check_restored(restored, accountants, plan, train_key) -> None:
    """Rebuilds the accountants by composing the restored rounds again, in order, as the run
    did (so epsilon is bit-identical), and checks them, the RNG position and the state
    against the checkpoint."""
    fix = "start over with --run.resume false or choose another --run.output_dir"
    if restored.train_key != checkpointing.key_fingerprint(train_key):
        raise ValueError(
            f"the checkpoint's training key {restored.train_key} is not this run's: was JAX's "
            f"PRNG implementation (jax_default_prng_impl) changed? Restore it, or {fix}"
        )
    if int(restored.state.round) != restored.round or len(restored.history) != restored.round:
        raise ValueError(f"the checkpoint of round {restored.round} is inconsistent; {fix}")
    if set(restored.accountants) != set(accountants):
        raise ValueError(
            f"the checkpoint accounts {sorted(restored.accountants)}, this run "
            f"{sorted(accountants)}; {fix}"
        )
    plan.replay(restored.round)
    for label, acct in accountants.items():
        saved_eps = restored.history[-1][f"epsilon_{label}"] if restored.history else 0.0
        same = json.loads(json.dumps(acct.state_dict())) == restored.accountants[label]
        if not same or acct.epsilon() != saved_eps:
            raise ValueError(
                f"the checkpoint's {label}-level accountant differs from this run's rounds "
                f"(epsilon {saved_eps} saved, {acct.epsilon()} recomputed); {fix}"
            )


def _postfix(history, accountants) -> dict[str, str]:
    """The progress bar's postfix: the latest test accuracy and epsilon."""
    post = {}
    acc = next((h["test_accuracy"] for h in reversed(history) if "test_accuracy" in h), None)
    if acc is not None:
        post["acc"] = f"{acc:.3f}"
    if history:
        post.update({f"eps_{u}": f"{history[-1][f'epsilon_{u}']:.2f}" for u in accountants})
    return post


class _RowWriter(loop_lib.Callback):
    """At each flush, appends the rows not written yet to ``metrics.jsonl`` (and TensorBoard);
    ``written``: how many of ``history``'s rows are on disk already."""

    def __init__(self, history: list[dict[str, Any]], written: int, metrics_file, tb) -> None:
        self.history, self.written = history, written
        self.metrics_file, self.tb = metrics_file, tb

    def on_flush(self, done: int, state: Any) -> None:
        _write_rows(self.history[self.written :], self.metrics_file, self.tb)
        self.written = len(self.history)


def attack_split(cfg: ExperimentConfig, train):
    """``(held_in, held_out)`` clients for ``privacy.attack`` (``(train, None)`` when off)."""
    if not cfg.privacy.attack:
        return train, None
    h = cfg.privacy.attack_holdout
    if not 0.0 < h < 1.0:  # also rejects NaN
        raise ValueError(f"privacy.attack_holdout={h} must be strictly between 0 and 1, e.g. 0.2")
    if train.num_clients < 2:
        raise ValueError("privacy.attack needs at least 2 clients (some held out)")
    return attacks_lib.split_clients(train, h, seed=cfg.run.seed)


def attack_metrics(model, params, held_in, held_out) -> dict[str, Any]:
    """The loss-threshold membership attack on clients, as ``attack_*`` summary entries."""
    result = attacks_lib.loss_threshold_attack(model, params, held_in, held_out)
    return {f"attack_{k}": v for k, v in result.items()}


def _summary_writer_cls():
    """tensorboardX's ``SummaryWriter`` (a light TensorBoard writer: no TensorFlow)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ValueError(
            "run.tensorboard = true needs tensorboardX: pip install 'fedjax_dp[tensorboard]' "
            "(or set --run.tensorboard false)"
        ) from None
    return SummaryWriter


# Row entries that are not plotted in TensorBoard (the step is the round).
_NOT_PLOTTED = ("round", "delta", "elapsed_s")


def _write_rows(rows, metrics_file, tb) -> None:
    """Appends metrics rows to ``metrics.jsonl`` (and TensorBoard), flushed."""
    if metrics_file is not None:
        metrics_file.writelines(json.dumps(h) + "\n" for h in rows)
        metrics_file.flush()
    if tb is not None:
        for row in rows:
            for name, value in row.items():
                if name not in _NOT_PLOTTED and isinstance(value, (int, float)):
                    tb.add_scalar(name, value, row["round"])
        tb.flush()


def save_params(path: str | os.PathLike, params) -> None:
    """Saves a parameter pytree to ``.npz`` with keys like ``Dense_0/kernel``."""
    flat = {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path_): np.asarray(v)
        for path_, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    np.savez(path, **flat)


def load_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads what :func:`save_params` wrote, as a flat ``{path: array}`` dict."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}
