"""FedProx's systems-heterogeneity experiment on Synthetic(1,1): FedAvg vs FedProx.

The FedProx paper (Li et al., MLSys 2020, Fig. 1 and Sec. 5.2) runs 30 devices, 10 per round,
E = 20 local epochs, batch 10, SGD with learning rate 0.01, and makes 0%, 50% or 90% of each
round's devices stragglers that run fewer epochs (uniform in 1..E-1). FedAvg drops the
stragglers; FedProx keeps their partial work, with mu = 0 or mu = 1. The paper reports that
with 90% stragglers FedProx with mu > 0 is more stable and converges better than FedAvg.

This script runs the nine configurations for each seed on experiments/fedprox_synthetic.toml's
Synthetic(1,1) (the dataset drawn once, data.partition_seed = 0; the seeds vary
initialisation, sampling, stragglers and data order), records per round the training loss of
the global model on all training data (the paper's global objective, examples weighted) and
the test accuracy, and writes experiments/results/fedprox_systems.{json,md,png}.

Stragglers here are drawn independently per client with probability 0.5 / 0.9 (the paper
takes exactly that fraction of each round's devices; see fedjax_dp.systems).

    python experiments/fedprox_systems.py                # 3 seeds x 9 configs x 200 rounds
    python experiments/fedprox_systems.py --seeds 0 --rounds 20   # a quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import time

import jax
import numpy as np

import fedjax_dp
from fedjax_dp import experiment

HERE = pathlib.Path(__file__).resolve().parent
CONFIG = HERE / "fedprox_synthetic.toml"
RESULTS = HERE / "results"
STRAGGLERS = (0.0, 0.5, 0.9)
METHODS = {
    "FedAvg": dict(name="fedavg", straggler_policy="drop"),
    "FedProx (mu=0)": dict(name="fedprox", mu=0.0),
    "FedProx (mu=1)": dict(name="fedprox", mu=1.0),
}


def run_one(method: str, stragglers: float, seed: int, rounds: int) -> dict:
    cfg = experiment.load_config(
        CONFIG, {"run.seed": seed, "data.partition_seed": 0, "run.rounds": rounds}
    )
    train, (x_test, y_test) = experiment.load_data(cfg)
    model = experiment.make_model(cfg, train.feature_shape, train.num_classes)
    algo = dataclasses.replace(
        experiment.algorithm_config(cfg), straggler_fraction=stragglers, **METHODS[method]
    )
    sim = fedjax_dp.build_simulation(algo, model, train)
    n = int(np.sum(train.counts))
    x_train, y_train = np.asarray(train.x)[:n], np.asarray(train.y)[:n]
    root = jax.random.key(seed)
    state = sim.init(jax.random.fold_in(root, 0))
    train_key = jax.random.fold_in(root, 1)
    dev, hp = train.to_device(), sim.make_hparams()
    losses, accs, uploads = [], [], []
    start = time.perf_counter()
    for r in range(rounds):
        state, m = sim.round_fn(state, dev, hp, jax.random.fold_in(train_key, r))
        uploads.append(int(m["num_uploads"]))
        losses.append(fedjax_dp.evaluate(model, state.params, x_train, y_train)["loss"])
        accs.append(fedjax_dp.evaluate(model, state.params, x_test, y_test)["accuracy"])
    return {
        "train_loss": losses,
        "test_accuracy": accs,
        "mean_uploads": float(np.mean(uploads)),
        "wall_s": time.perf_counter() - start,
    }


def summarise(runs: dict, seeds: list[int], rounds: int) -> dict:
    out = {
        "config": str(CONFIG.relative_to(HERE.parent)),
        "command": "python experiments/fedprox_systems.py"
        + (f" --seeds {' '.join(map(str, seeds))}" if seeds != [0, 1, 2] else "")
        + (f" --rounds {rounds}" if rounds != 200 else ""),
        "seeds": seeds,
        "rounds": rounds,
        "machine": f"{platform.machine()} CPU, {platform.system()}",
        "results": {},
    }
    for s in STRAGGLERS:
        for method in METHODS:
            rs = [runs[(method, s, seed)] for seed in seeds]
            loss = np.array([r["train_loss"] for r in rs])
            acc = np.array([r["test_accuracy"] for r in rs])
            tail = max(1, rounds // 4)
            out["results"][f"{method} | {int(s * 100)}% stragglers"] = {
                "final_train_loss_mean": float(loss[:, -1].mean()),
                "final_train_loss_per_seed": [round(float(v), 4) for v in loss[:, -1]],
                "final_test_accuracy_mean": float(acc[:, -1].mean()),
                "final_test_accuracy_per_seed": [round(float(v), 4) for v in acc[:, -1]],
                # Stability: how much the training loss moves between consecutive rounds in the
                # last quarter of training (mean absolute change), averaged over seeds.
                "late_train_loss_jitter": float(np.mean(np.abs(np.diff(loss[:, -tail:], axis=1)))),
                "max_train_loss_last_quarter": float(loss[:, -tail:].max()),
                "mean_uploads_per_round": float(np.mean([r["mean_uploads"] for r in rs])),
                "wall_s_per_seed": [round(r["wall_s"], 1) for r in rs],
            }
    return out


def write_markdown(summary: dict, path: pathlib.Path) -> None:
    lines = [
        "# FedProx systems heterogeneity on Synthetic(1,1)",
        "",
        (
            f"Command: `{summary['command']}` ({summary['machine']}); {summary['rounds']} "
            f"rounds, seeds {summary['seeds']}; mean over seeds (per-seed values in "
            "fedprox_systems.json)."
        ),
        "",
        (
            "| method | stragglers | uploads/round | final train loss | final test acc | "
            "late loss jitter | max loss, last quarter |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["results"].items():
        method, strag = name.split(" | ")
        lines.append(
            f"| {method} | {strag.split()[0]} | {r['mean_uploads_per_round']:.2f} | "
            f"{r['final_train_loss_mean']:.4f} | {r['final_test_accuracy_mean']:.4f} | "
            f"{r['late_train_loss_jitter']:.4f} | {r['max_train_loss_last_quarter']:.4f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(runs: dict, seeds: list[int], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7), dpi=100, sharex=True)
    colors = {"FedAvg": "tab:green", "FedProx (mu=0)": "tab:purple", "FedProx (mu=1)": "tab:red"}
    for j, s in enumerate(STRAGGLERS):
        for method, color in colors.items():
            loss = np.array([runs[(method, s, seed)]["train_loss"] for seed in seeds])
            acc = np.array([runs[(method, s, seed)]["test_accuracy"] for seed in seeds])
            x = np.arange(1, loss.shape[1] + 1)
            axes[0, j].plot(x, loss.mean(0), color=color, label=method, linewidth=1.2)
            axes[0, j].fill_between(x, loss.min(0), loss.max(0), color=color, alpha=0.15)
            axes[1, j].plot(x, acc.mean(0), color=color, label=method, linewidth=1.2)
            axes[1, j].fill_between(x, acc.min(0), acc.max(0), color=color, alpha=0.15)
        axes[0, j].set_title(f"{int(s * 100)}% stragglers")
        axes[1, j].set_xlabel("communication round")
        axes[0, j].set_ylim(0, 3)
        axes[1, j].set_ylim(0, 1)
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("training loss (global model)")
    axes[1, 0].set_ylabel("test accuracy")
    axes[0, 0].legend()
    fig.suptitle(
        f"Synthetic(1,1), E=20, 10 of 30 devices per round; mean and range over {len(seeds)} seeds"
    )
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    runs = {}
    for seed in args.seeds:
        for s in STRAGGLERS:
            for method in METHODS:
                runs[(method, s, seed)] = r = run_one(method, s, seed, args.rounds)
                print(
                    f"seed {seed} {int(s * 100):>2}% stragglers {method:<15} "
                    f"loss {r['train_loss'][-1]:.4f} acc {r['test_accuracy'][-1]:.4f} "
                    f"({r['wall_s']:.1f} s)",
                    flush=True,
                )
    RESULTS.mkdir(exist_ok=True)
    summary = summarise(runs, args.seeds, args.rounds)
    curves = {f"{m} | {int(s * 100)}% | seed {seed}": v for (m, s, seed), v in runs.items()}
    (RESULTS / "fedprox_systems.json").write_text(
        json.dumps({**summary, "curves": curves}, indent=1) + "\n"
    )
    write_markdown(summary, RESULTS / "fedprox_systems.md")
    plot(runs, args.seeds, RESULTS / "fedprox_systems.png")
    print((RESULTS / "fedprox_systems.md").read_text())


if __name__ == "__main__":
    main()
