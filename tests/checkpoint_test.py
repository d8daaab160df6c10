"""Checkpoints and resume: a killed run, resumed with the same command, ends bit for bit like
a run never stopped (parameters, metrics rows, epsilon), and never loses more than k rounds."""

import json
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from fedjax_dp import accounting, experiment
from fedjax_dp.core.algorithms import build_simulation
from fedjax_dp.runner import checkpointing
from tests import _testing

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = _testing.TINY_DP_RUN


def _config(tmp_path, out="run", **overrides):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    overrides = {"run.output_dir": str(tmp_path / out), **overrides}
    return path, experiment.load_config(path, overrides)


def _run(cfg, write=True):
    logs = []
    return experiment.run(cfg, write=write, log=logs.append), logs


def _rows(out):
    """The complete rows of metrics.jsonl (a kill may leave a partial last line)."""
    rows = []
    for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _without_time(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def _steps(out):
    """The complete checkpoints on disk (orbax renames a finished save to its round)."""
    d = pathlib.Path(out) / checkpointing.CHECKPOINT_DIR
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _assert_same_params(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_checkpoint_round_trip_and_resume_with_more_rounds(tmp_path):
    _, cfg = _config(tmp_path)
    result, _ = _run(cfg)
    out = tmp_path / "run"
    assert _steps(out) == [4, 6]  # every 4 rounds and after the last; max_to_keep = 2

    # The checkpoint holds the state, history, accountants and RNG position of round 6.
    train, _ = experiment.load_data(cfg)
    model = experiment.make_model(cfg, train.feature_shape, train.num_classes)
    sim = build_simulation(experiment.algorithm_config(cfg), model, train)
    fresh = sim.init(jax.random.key(0))
    ckpts = checkpointing.Checkpointer(out / checkpointing.CHECKPOINT_DIR)
    try:
        assert ckpts.rounds == [4, 6]
        got = ckpts.restore(fresh)
    finally:
        ckpts.close()
    assert got.round == 6 and int(got.state.round) == 6
    assert jax.tree.structure(got.state) == jax.tree.structure(fresh)
    _assert_same_params(got.state.params, result.params)
    assert got.history == result.history == _rows(out)
    acct = accounting.Accountant.from_state_dict(got.accountants["user"])
    assert acct.rounds == 6
    assert acct.epsilon() == result.final["epsilon_user"]
    train_key = jax.random.fold_in(jax.random.key(cfg.run.seed), 1)
    assert got.train_key == checkpointing.key_fingerprint(train_key)
    assert got.config == experiment.to_dict(cfg)

    # run.rounds may grow on resume: 6 + 3 rounds equal 9 rounds in one go.
    _, longer = _config(tmp_path, **{"run.rounds": 9})
    resumed, logs = _run(longer)
    assert f"resumed from round 6 of 9 ({out / 'checkpoints'})" in logs
    reference, _ = _run(longer, write=False)
    _assert_same_params(resumed.params, reference.params)
    assert resumed.final["epsilon_user"] == reference.final["epsilon_user"]
    rows = _rows(out)
    assert [r["round"] for r in rows] == list(range(1, 10))
    assert _without_time(rows[6:]) == _without_time(reference.history[6:])
    assert _steps(out) == [8, 9]


def test_changed_config_is_refused_and_resume_false_starts_over(tmp_path):
    _, cfg = _config(tmp_path, **{"run.rounds": 3})
    _run(cfg)
    out = tmp_path / "run"
    assert _steps(out) == [3]

    _, changed = _config(tmp_path, **{"run.rounds": 3, "algorithm.client_lr": 0.1})
    with pytest.raises(ValueError, match=r"algorithm\.client_lr was 0\.2, now 0\.1") as e:
        experiment.run(changed)
    assert "--run.resume false" in str(e.value) and "--run.output_dir" in str(e.value)
    _, fewer = _config(tmp_path, **{"run.rounds": 2})
    with pytest.raises(ValueError, match=r"run\.rounds=2 is below round 3"):
        experiment.run(fewer)

    # Options that do not change the result may change: the complete run is just reloaded.
    _, same = _config(tmp_path, **{"run.rounds": 3, "run.eval_every": 1, "run.progress": True})
    _, logs = _run(same)
    (line,) = [line for line in logs if line.startswith("resumed from round 3 of 3")]
    assert "already complete" in line and "--run.resume false" in line

    _, fresh = _config(
        tmp_path, **{"run.rounds": 3, "algorithm.client_lr": 0.1, "run.resume": False}
    )
    _, logs = _run(fresh)
    assert not any(line.startswith("resumed") for line in logs)
    assert _steps(out) == [3]
    assert json.loads((out / "config.json").read_text())["algorithm"]["client_lr"] == 0.1
    assert [r["round"] for r in _rows(out)] == [1, 2, 3]


def test_config_changes_rules():
    base = experiment.to_dict(experiment.ExperimentConfig())
    defaults = experiment.to_dict(experiment.ExperimentConfig())

    def changed(section, **kw):
        d = json.loads(json.dumps(base))
        d[section].update(kw)
        return d

    assert checkpointing.config_changes(base, changed("run", rounds=500), defaults) == []
    assert checkpointing.config_changes(base, changed("run", progress=False), defaults) == []
    assert checkpointing.config_changes(base, changed("audit", canaries=3), defaults) == []
    assert checkpointing.config_changes(base, changed("run", seed=1), defaults) == [
        ("run.seed", 0, 1)
    ]
    # With a target epsilon the number of rounds sets the noise: it may not change.
    target = changed("privacy", target_epsilon=5.0)
    longer = json.loads(json.dumps(target))
    longer["run"]["rounds"] = 500
    assert checkpointing.config_changes(target, longer, defaults) == [("run.rounds", 100, 500)]
    # An option missing from an older checkpoint counts with its default.
    old = json.loads(json.dumps(base))
    del old["privacy"]["attack"]
    assert checkpointing.config_changes(old, base, defaults) == []


def test_bad_checkpoint_every_names_the_option(tmp_path):
    _, cfg = _config(tmp_path, **{"run.checkpoint_every": -1})
    with pytest.raises(ValueError, match=r"run\.checkpoint_every=-1 must be >= 0.*0 = no"):
        experiment.run(cfg)


def test_ctrl_c_checkpoints_the_last_round(tmp_path, monkeypatch):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach only the main thread")
    _, cfg = _config(tmp_path, **{"run.rounds": 10, "run.eval_every": 1})
    evaluate = experiment.evaluate
    calls = []

    def evaluate_then_ctrl_c(*args, **kw):
        calls.append(1)
        if len(calls) == 5:  # while round 5 is evaluated
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kw)

    monkeypatch.setattr(experiment, "evaluate", evaluate_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg)
    out = tmp_path / "run"
    assert _steps(out) == [4, 5]  # the interval's checkpoint and the interrupted round
    assert [r["round"] for r in _rows(out)] == [1, 2, 3, 4, 5]
    monkeypatch.setattr(experiment, "evaluate", evaluate)
    result, logs = _run(cfg)
    assert "resumed from round 5 of 10" in " ".join(logs)
    assert [r["round"] for r in _rows(out)] == list(range(1, 11))
    assert result.final["round"] == 10


def _cli(config, out, *extra):
    cmd = [sys.executable, "-m", "fedjax_dp", "run", str(config), "--run.output_dir", str(out)]
    return cmd + list(extra)


def test_sigkill_mid_run_then_resume_is_bit_for_bit(tmp_path):
    """SIGKILL a CLI run after a checkpoint, rerun the same command: same params, rows, eps."""
    k = 5
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    config, _ = _config(tmp_path)
    out = tmp_path / "killed"
    for rounds in (150, 1500):  # more rounds if the first run finished before the kill
        args = ["--run.rounds", str(rounds), "--run.eval_every", "1"]
        args += ["--run.checkpoint_every", str(k)]
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(
            _cli(config, out, *args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if _steps(out) and _steps(out)[-1] >= 10 * k:  # well inside the round loop
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
        if not (out / "summary.json").exists():
            break
    else:
        pytest.fail("the run finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL
    steps = _steps(out)
    assert 10 * k <= steps[-1] < rounds
    # Never more than k rounds lost: the latest checkpoint is within k rounds of the last row
    # written (every round is written: eval_every = 1). Checkpoints are every k rounds; the
    # last 2 are kept (a third until the newest is complete, if the kill came in between).
    last_written = _rows(out)[-1]["round"]
    assert last_written - k <= steps[-1] <= last_written
    assert 2 <= len(steps) <= 3 and all(s % k == 0 for s in steps)
    assert steps == list(range(steps[0], steps[-1] + 1, k))

    # The same command again: it resumes (run.resume is on by default) and runs to the end.
    done = subprocess.run(
        _cli(config, out, *args), env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr
    assert f"resumed from round {steps[-1]} of {rounds}" in done.stdout
    assert _steps(out) == [rounds - k, rounds]

    _, reference_cfg = _config(
        tmp_path,
        out="reference",
        **{"run.rounds": rounds, "run.eval_every": 1, "run.checkpoint_every": 0},
    )
    reference, _ = _run(reference_cfg)
    got = experiment.load_params(out / "params.npz")
    want = experiment.load_params(tmp_path / "reference" / "params.npz")
    assert got.keys() == want.keys()
    for name in got:
        assert got[name].dtype == want[name].dtype
        assert np.array_equal(got[name], want[name]), name
    rows = _rows(out)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))  # no row lost or repeated
    assert _without_time(rows) == _without_time(_rows(tmp_path / "reference"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon_user"] == reference.final["epsilon_user"]


def _scalars(logdir):
    """``{tag: {step: value}}`` read back from tensorboardX event files (TFRecord framing)."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    out = {}
    for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    _, cfg = _config(tmp_path, **{"run.rounds": 3, "run.tensorboard": True})
    result, _ = _run(cfg)
    scalars = _scalars(tmp_path / "run" / "tensorboard")
    assert "train_loss" not in scalars  # a DP run does not release it
    assert sorted(scalars["epsilon_user"]) == [1, 2, 3]
    assert sorted(scalars["test_accuracy"]) == [3]
    assert scalars["epsilon_user"][3] == pytest.approx(result.final["epsilon_user"], rel=1e-6)
    assert scalars["test_loss"][3] == pytest.approx(result.final["test_loss"], rel=1e-6)


def test_tensorboard_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    _, cfg = _config(tmp_path, **{"run.tensorboard": True})
    with pytest.raises(ValueError, match=r"pip install 'fedjax_dp\[tensorboard\]'"):
        experiment.run(cfg)


def test_restore_refuses_other_dtypes(tmp_path):
    """orbax would cast to the target's dtype; a resumed run must not change silently."""
    state = {"w": jax.numpy.ones((3,)), "n": jax.numpy.zeros((), jax.numpy.int32)}
    ckpts = checkpointing.Checkpointer(tmp_path)
    try:
        ckpts.save(
            1,
            state,
            history=[{"round": 1}],
            accountants={},
            train_key=jax.random.key(0),
            config={},
            elapsed_s=0.5,
        )
        got = ckpts.restore(state)
        assert got.round == 1 and got.history == [{"round": 1}] and got.elapsed_s == 0.5
        _assert_same_params(got.state, state)
        as_bf16 = {**state, "w": state["w"].astype(jax.numpy.bfloat16)}
        with pytest.raises(ValueError, match=r"state\[w\] as float32, this run has bfloat16"):
            ckpts.restore(as_bf16)
        with pytest.raises(ValueError, match="expected one per round"):
            ckpts.save(
                2,
                state,
                history=[],
                accountants={},
                train_key=jax.random.key(0),
                config={},
                elapsed_s=0.0,
            )
    finally:
        ckpts.close()
