"""SCAFFOLD vs FedAvg under strong label skew: rounds to a target test accuracy.

Digits (scikit-learn's bundled handwritten digits, no download) over 100 clients with a
Dirichlet(0.1) label partition (most clients hold one or two classes), a 32-unit MLP, 10
clients per round, 5 local epochs of SGD (batch 8, learning rate 0.05), server learning
rate 1, no DP. SCAFFOLD (Karimireddy et al. 2020, option II) corrects each client's drift
with control variates; the question is how many rounds each needs to reach a target test
accuracy. Writes experiments/results/scaffold_dirichlet.{json,md}.

    python experiments/scaffold_dirichlet.py                 # 3 seeds x 2 methods x 150 rounds
    python experiments/scaffold_dirichlet.py --seeds 0 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import numpy as np

import fedjax_dp
from fedjax_dp import experiment

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGETS = (0.8, 0.85, 0.9)
METHODS = ("fedavg", "scaffold")


def run_one(method: str, seed: int, rounds: int) -> dict:
    cfg = experiment.load_config(
        None,
        {
            "run.seed": seed,
            "data.partition_seed": 0,
            "data.source": "digits",
            "data.num_clients": 100,
            "data.partition": "dirichlet",
            "data.alpha": 0.1,
            "model.name": "mlp",
            "model.hidden": [32],
            "algorithm.name": method,
            "algorithm.cohort_size": 10,
            "algorithm.local_epochs": 5,
            "algorithm.batch_size": 8,
            "algorithm.client_lr": 0.05,
            "algorithm.server_lr": 1.0,
        },
    )
    train, (x_test, y_test) = experiment.load_data(cfg)
    model = experiment.make_model(cfg, train.feature_shape, train.num_classes)
    sim = fedjax_dp.build_simulation(experiment.algorithm_config(cfg), model, train)
    root = jax.random.key(seed)
    state = sim.init(jax.random.fold_in(root, 0))
    train_key = jax.random.fold_in(root, 1)
    dev, hp = train.to_device(), sim.make_hparams()
    accs = []
    start = time.perf_counter()
    for r in range(rounds):
        state, _ = sim.round_fn(state, dev, hp, jax.random.fold_in(train_key, r))
        accs.append(fedjax_dp.evaluate(model, state.params, x_test, y_test)["accuracy"])
    return {"test_accuracy": accs, "wall_s": time.perf_counter() - start}


def rounds_to(accs: list[float], target: float) -> int | None:
    """First round (1-based) whose test accuracy reaches ``target``; None if never."""
    hit = np.nonzero(np.asarray(accs) >= target)[0]
    return int(hit[0]) + 1 if hit.size else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=150)
    args = ap.parse_args()
    runs = {}
    for seed in args.seeds:
        for method in METHODS:
            runs[(method, seed)] = r = run_one(method, seed, args.rounds)
            print(
                f"seed {seed} {method:<9} final acc {r['test_accuracy'][-1]:.4f} "
                + " ".join(f"->{t}: {rounds_to(r['test_accuracy'], t)}" for t in TARGETS)
                + f" ({r['wall_s']:.1f} s)",
                flush=True,
            )
    command = (
        "python experiments/scaffold_dirichlet.py"
        + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2] else "")
        + (f" --rounds {args.rounds}" if args.rounds != 150 else "")
    )
    summary = {
        "command": command,
        "machine": f"{platform.machine()} CPU, {platform.system()}",
        "seeds": args.seeds,
        "rounds": args.rounds,
        "results": {
            method: {
                "final_test_accuracy_per_seed": [
                    round(runs[(method, s)]["test_accuracy"][-1], 4) for s in args.seeds
                ],
                **{
                    f"rounds_to_{t}_per_seed": [
                        rounds_to(runs[(method, s)]["test_accuracy"], t) for s in args.seeds
                    ]
                    for t in TARGETS
                },
            }
            for method in METHODS
        },
    }
    lines = [
        "# SCAFFOLD vs FedAvg on digits, Dirichlet(0.1) over 100 clients",
        "",
        (
            f"Command: `{command}` ({summary['machine']}). Rounds to reach a test accuracy "
            "(per seed; '-' = not within the run)."
        ),
        "",
        "| method | final accuracy | " + " | ".join(f"rounds to {t}" for t in TARGETS) + " |",
        "|---|---|" + "---|" * len(TARGETS),
    ]
    for method, r in summary["results"].items():
        cells = [
            ", ".join("-" if v is None else str(v) for v in r[f"rounds_to_{t}_per_seed"])
            for t in TARGETS
        ]
        acc = ", ".join(f"{a:.3f}" for a in r["final_test_accuracy_per_seed"])
        lines.append(f"| {method} | {acc} | " + " | ".join(cells) + " |")
    RESULTS.mkdir(exist_ok=True)
    curves = {f"{m} | seed {s}": v["test_accuracy"] for (m, s), v in runs.items()}
    (RESULTS / "scaffold_dirichlet.json").write_text(
        json.dumps({**summary, "curves": curves}, indent=1) + "\n"
    )
    (RESULTS / "scaffold_dirichlet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
