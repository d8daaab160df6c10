"""Experiments: configuration files, the host loop over rounds, metrics and outputs.

The host loop runs over ROUNDS only; everything inside a round is one jitted call. Round
metrics stay on device until the next evaluation point, so rounds are dispatched without a
host sync in between.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
import types
import typing
import warnings
from typing import Any

import jax
import numpy as np
import tomllib

from fedjax_dp import accounting
from fedjax_dp._src import data as data_lib
from fedjax_dp._src import models as models_lib
from fedjax_dp._src.algorithms import AlgorithmConfig, build_simulation
from fedjax_dp._src.evaluation import evaluate


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
    progress: bool = _field(True, "show a progress bar")


@dataclasses.dataclass
class DataConfig:
    source: str = _field(
        "digits",
        "'digits' (scikit-learn's bundled digits, no download) or "
        "'npz' (a file with arrays x, y, client_ids; optional x_test, y_test)",
    )
    path: str = _field("", "the .npz file for source='npz'")
    num_clients: int = _field(100, "number of clients to partition digits into")
    partition: str = _field("dirichlet", "iid | dirichlet | shards | quantity_skew")
    alpha: float = _field(0.5, "Dirichlet concentration (smaller = more label skew)")
    shards_per_client: int = _field(2, "label shards per client for partition='shards'")
    sigma: float = _field(1.0, "log-normal sigma of client sizes for partition='quantity_skew'")
    test_fraction: float = _field(0.2, "held-out fraction for evaluation")
    input_shape: list = _field([], "reshape each example to this shape, e.g. [8, 8, 1] for 'cnn'")  # noqa: RUF009


@dataclasses.dataclass
class ModelConfig:
    name: str = _field("mlp", "mlp | logistic | cnn")
    hidden: list = _field([64], "hidden layer widths for 'mlp'")  # noqa: RUF009
    channels: list = _field([16, 32], "conv channels for 'cnn'")  # noqa: RUF009


_ALGO_HELP = {
    "name": "fedavg | fedsgd | dp_fedavg | dp_sgd_fedavg | fedadam | fedyogi | fedadagrad",
    "sampling": "cohort sampling: 'fixed' (cohort_size clients) or 'poisson' (rate sampling_rate)",
    "cohort_size": "clients per round for sampling='fixed'",
    "sampling_rate": "inclusion probability q for sampling='poisson'",
    "local_epochs": "passes over each client's data per round",
    "local_steps": "fixed local steps instead of local_epochs (set local_epochs to 0)",
    "batch_size": "local batch size (0 = whole client dataset)",
    "client_optimizer": "any optax optimizer name, e.g. sgd, adam",
    "client_lr": "client learning rate (traced: changing it does not recompile)",
    "server_optimizer": "optax optimizer on the pseudo-gradient: sgd (FedAvg), adam, yogi, adagrad",
    "server_lr": "server learning rate (1.0 with sgd is plain FedAvg)",
    "weighting": "aggregation weights: uniform | num_examples (non-DP only)",
    "clip_norm": "user-level DP: L2 clip norm of each client's delta",
    "noise_multiplier": "user-level DP: noise std / clip_norm on the summed deltas",
    "example_clip_norm": "example-level DP-SGD: per-example gradient clip norm",
    "example_noise_multiplier": "example-level DP-SGD: noise std / example_clip_norm per step",
    "chunk_size": "clients vmapped together; chunks run in sequence (0 = auto from the budget)",
    "memory_budget_mb": "working memory for the auto chunk size (0 = 16 MiB on CPU, 1/4 of GPU)",
    "clipping": "DP-SGD per-example clipping: auto | ghost (fast, Flax Dense/Conv) | per_example",
}


@dataclasses.dataclass
class PrivacyConfig:
    delta: float = _field(1e-5, "target delta for the reported epsilon (well below 1/population)")
    accountant: str = _field("rdp", "rdp | pld (dp-accounting)")
    conversion: str = _field("improved", "RDP to (eps, delta): improved | classic")


@dataclasses.dataclass
class ExperimentConfig:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)


SECTIONS = ("run", "data", "model", "algorithm", "privacy")


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
        try:
            return [int(v) for v in value]
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a list of integers") from None
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


def load_data(cfg: ExperimentConfig):
    """Returns ``(train FederatedData, (x_test, y_test))`` for ``cfg.data``."""
    d = cfg.data
    if d.source == "digits":
        (x, y), (x_test, y_test) = data_lib.load_digits(
            test_fraction=d.test_fraction, seed=cfg.run.seed
        )
        client_ids = data_lib.partition(
            y,
            num_clients=d.num_clients,
            method=d.partition,
            seed=cfg.run.seed,
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
            rng = np.random.default_rng(cfg.run.seed)
            test = rng.random(len(y)) < d.test_fraction
            x_test, y_test = x[test], y[test]
            x, y, client_ids = x[~test], y[~test], client_ids[~test]
    else:
        raise ValueError(f"data.source={d.source!r} must be 'digits' or 'npz'")
    if d.input_shape:
        shape = tuple(d.input_shape)
        if math.prod(shape) != math.prod(x.shape[1:]):
            raise ValueError(
                f"data.input_shape={list(shape)} does not fit examples of {math.prod(x.shape[1:])} "
                "values"
            )
        x = np.reshape(x, (len(x),) + shape)
        x_test = np.reshape(x_test, (len(x_test),) + shape)
    num_classes = int(max(np.max(y), np.max(y_test))) + 1 if len(y_test) else None
    train = data_lib.from_arrays(x, y, client_ids, num_classes=num_classes)
    return train, (np.asarray(x_test, np.float32), np.asarray(y_test, np.int32))


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


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class RunResult:
    params: Any
    final: dict[str, float]
    history: list[dict[str, Any]]
    output_dir: pathlib.Path | None


def _check(cfg: ExperimentConfig) -> None:
    r, p = cfg.run, cfg.privacy
    if r.rounds < 1:
        raise ValueError(f"run.rounds={r.rounds} must be >= 1")
    if r.eval_every < 1:
        raise ValueError(f"run.eval_every={r.eval_every} must be >= 1")
    if not (0.0 < p.delta < 1.0):  # also rejects NaN
        raise ValueError(f"privacy.delta={p.delta} must be in (0, 1), e.g. 1e-5")


def run(cfg: ExperimentConfig, *, write: bool = True, log=print) -> RunResult:
    """Runs the experiment: trains, evaluates every ``eval_every`` rounds, accounts privacy.

    Writes to ``cfg.run.output_dir``: ``config.json``, ``metrics.jsonl`` (one JSON object per
    evaluation point), ``params.npz`` (final parameters, flattened by path) and
    ``summary.json``.
    """
    _check(cfg)
    train, (x_test, y_test) = load_data(cfg)
    model = make_model(cfg, train.feature_shape, train.num_classes)
    sim = build_simulation(algorithm_config(cfg), model, train)
    hparams = sim.make_hparams()
    privacy = sim.round_privacy({k: float(v) for k, v in hparams.items()})
    accountants = {
        rp.unit: (
            rp,
            accounting.Accountant(
                delta=cfg.privacy.delta,
                accountant=cfg.privacy.accountant,
                conversion=cfg.privacy.conversion,
            ),
        )
        for rp in privacy
    }
    if privacy and cfg.privacy.delta >= 1.0 / train.num_clients:
        warnings.warn(
            f"privacy.delta={cfg.privacy.delta} is not below 1/population "
            f"({1.0 / train.num_clients:.3g}); choose a smaller delta",
            stacklevel=2,
        )

    out_dir = pathlib.Path(cfg.run.output_dir) if write else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        metrics_file = open(out_dir / "metrics.jsonl", "w")  # noqa: SIM115 - closed in finally
    root = jax.random.key(cfg.run.seed)
    state = sim.init(jax.random.fold_in(root, 0))
    train_key = jax.random.fold_in(root, 1)
    device_data = train.to_device()
    desc = (
        f"{sim.config.name} on {train.num_clients} clients "
        f"({sim.sampler.sampling} cohort ~{sim.sampler.expected_cohort_size:g})"
    )
    log(desc)
    for rp in privacy:
        log(
            f"  privacy: {rp.unit}-level, noise multiplier {rp.noise_multiplier:g}, "
            f"delta {cfg.privacy.delta:g}, accountant {cfg.privacy.accountant}"
        )
    bar = _progress(cfg.run.rounds, cfg.run.progress)
    pending: list[tuple[int, dict[str, Any]]] = []
    history: list[dict[str, Any]] = []
    overflow_total = 0
    written = 0  # rows of `history` already in metrics.jsonl
    start = time.perf_counter()
    try:
        for r in range(cfg.run.rounds):
            state, metrics = sim.round_fn(
                state, device_data, hparams, jax.random.fold_in(train_key, r)
            )
            pending.append((r + 1, metrics))
            last = r + 1 == cfg.run.rounds
            if (r + 1) % cfg.run.eval_every == 0 or last:
                # One host sync per evaluation point: fetch the pending rounds' metrics.
                for rnd, m in zip([i for i, _ in pending], jax.device_get([m for _, m in pending])):
                    row = {
                        "round": rnd,
                        "train_loss": float(m["train_loss"]),
                        "num_clients": int(m["num_clients"]),
                        "cohort_overflow": int(m["cohort_overflow"]),
                    }
                    overflow_total += row["cohort_overflow"]
                    for unit, (rp, acct) in accountants.items():
                        acct.compose(rp, 1)
                        row[f"epsilon_{unit}"] = acct.epsilon()
                    if accountants:
                        row["delta"] = cfg.privacy.delta
                    history.append(row)
                pending.clear()
                ev = evaluate(model, state.params, x_test, y_test)
                row.update(
                    test_loss=ev["loss"],
                    test_accuracy=ev["accuracy"],
                    elapsed_s=time.perf_counter() - start,
                )
                if out_dir is not None:
                    metrics_file.writelines(json.dumps(h) + "\n" for h in history[written:])
                    metrics_file.flush()
                recent = history[written:]
                written = len(history)
                train_loss = float(np.mean([h["train_loss"] for h in recent]))
                msg = (
                    f"round {r + 1:>5}/{cfg.run.rounds}  train loss {train_loss:.4f}  "
                    f"test loss {ev['loss']:.4f}  accuracy {ev['accuracy']:.4f}"
                )
                for unit in accountants:
                    msg += f"  eps({unit}) {row[f'epsilon_{unit}']:.3f}"
                bar.write(msg)
                bar.set_postfix(
                    acc=f"{ev['accuracy']:.3f}",
                    **{f"eps_{u}": f"{row[f'epsilon_{u}']:.2f}" for u in accountants},
                )
            bar.update(1)
    finally:
        bar.close()
        if out_dir is not None:
            metrics_file.close()
    if overflow_total:
        warnings.warn(
            f"Poisson sampling selected {overflow_total} clients more than the static "
            "cohort size over the run; they were left out (see cohort_overflow)",
            stacklevel=2,
        )
    final = dict(history[-1])  # the last round is always an evaluation point
    final["rounds_per_s"] = cfg.run.rounds / max(time.perf_counter() - start, 1e-9)
    final["cohort_overflow"] = overflow_total
    if out_dir is not None:
        save_params(out_dir / "params.npz", state.params)
        (out_dir / "summary.json").write_text(json.dumps(final, indent=2) + "\n")
    eps = "  ".join(f"epsilon ({u}-level) = {final[f'epsilon_{u}']:.3f}" for u in accountants)
    log(
        f"final accuracy {final['test_accuracy']:.4f}  test loss {final['test_loss']:.4f}"
        + (f"  {eps} at delta = {cfg.privacy.delta:g}" if accountants else "  (no DP)")
    )
    if out_dir is not None:
        log(f"wrote {out_dir}/metrics.jsonl, params.npz, summary.json")
    return RunResult(state.params, final, history, out_dir)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="round", dynamic_ncols=True, leave=False)


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
