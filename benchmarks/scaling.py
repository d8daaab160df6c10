"""R1 scaling: engine round time vs cohort size C, each C in its own process.

The R1 workload of ``benchmarks/r1.py`` (synthetic MNIST-shaped data, 32 examples per client,
DP-SGD inside each client, batch 8, 1 local epoch) run by the engine (``sim.round_fn``) for
C in {64, 128, ..., 4096}. Each C is one ``python -m benchmarks.r1 --one`` subprocess (so its
peak RSS is its own): 1 warm-up round, then ``--rounds`` timed rounds.

Reported per C: median round time, updates/s (C / median), time per client (median / C), peak
RSS, compile time, and the scaling ratio ``(t_C / t_base) / (C / base)`` where ``base`` is the
smallest C measured (64 by default): 1.0 means the round time grows exactly linearly in C,
below 1.0 means larger cohorts are cheaper per client. Note that the population is
max(1024, C) clients (as in R1), so the data held in memory grows with C above 1024.

The engine chunk size is chosen by the engine from its memory budget (``--chunk-size 0``, the
default; it depends on the model, not on C) or fixed across C (``--chunk-size N``).

Usage::

    python -m benchmarks.scaling                         # mlp, C = 64 .. 4096, 3 rounds
    python -m benchmarks.scaling --models mlp cnn --cohorts 64 128 256 512
    python -m benchmarks.scaling --quick                 # smoke test: mlp, C = 8, 16, 1 round

Writes a markdown table (stdout), a JSON file (``--out``) and a PNG (``--plot``): round time vs
C on log-log axes with a linear reference, and peak RSS vs C.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import r1

DEFAULT_COHORTS = (64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_CHUNK = 0  # automatic
DEFAULT_OUT = Path("benchmarks") / "results" / "scaling.json"
DEFAULT_PLOT = Path("benchmarks") / "results" / "scaling.png"
QUICK_OUT = Path("benchmarks") / "results" / "scaling_quick.json"
QUICK_PLOT = Path("benchmarks") / "results" / "scaling_quick.png"


def summarize(row: dict) -> dict:
    """The scaling metrics of one ``r1.run_one`` row (engine)."""
    c = row["cohort"]
    return {
        "model": row["model"],
        "cohort": c,
        "chunk_size": row["chunk_size"],
        "rounds_timed": row["rounds_timed"],
        "median_round_s": row["median_round_s"],
        "updates_per_s": row["updates_per_s"],
        "ms_per_client": 1e3 * row["median_round_s"] / c,
        "peak_rss_mib": row["peak_rss_mib"],
        "rss_after_setup_mib": row["rss_after_setup_mib"],
        "compile_s": row["compile_s"],
        "first_round_s": row["first_round_s"],
        "round_times_s": row["round_times_s"],
        "population": row["population"],
        "train_loss": row.get("train_loss"),
        "matmul_gflops": row["matmul_gflops"],
        "loadavg_1min_start": row["loadavg_1min_start"],
        "loadavg_1min_end": row["loadavg_1min_end"],
    }


def add_scaling(rows: list[dict]) -> None:
    """Sets ``scaling_vs_base`` = (t_C / t_base) / (C / base) per model; base = smallest C."""
    for model in {r["model"] for r in rows}:
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["cohort"])
        base = mine[0]
        for r in mine:
            r["base_cohort"] = base["cohort"]
            r["scaling_vs_base"] = (r["median_round_s"] / base["median_round_s"]) / (
                r["cohort"] / base["cohort"]
            )


def predicted_s(prev: dict, cohort: int, rounds: int) -> float:
    """Wall time of the next configuration, from the previous one: its fixed cost (process
    start, data, compile, matmul) plus ``rounds + 1`` rounds scaled linearly in C."""
    rounds_s = prev["first_round_s"] + sum(prev["round_times_s"])
    fixed = max(prev["wall_s"] - rounds_s, 0.0)
    return fixed + (rounds + 1) * prev["median_round_s"] * cohort / prev["cohort"]


def table(rows: list[dict], skipped: list[dict]) -> str:
    base = rows[0]["base_cohort"] if rows else 64
    head = (
        "| model | C | chunk | median round s | updates/s | ms per client | peak RSS MiB "
        f"| compile s | (t/t_{base})/(C/{base}) |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["model"], r["cohort"])):
        out.append(
            f"| {r['model']} | {r['cohort']} | {r['chunk_size']} | {r['median_round_s']:.3f} "
            f"| {r['updates_per_s']:.1f} | {r['ms_per_client']:.2f} | {r['peak_rss_mib']:.0f} "
            f"| {r['compile_s']:.2f} | {r['scaling_vs_base']:.2f} |"
        )
    for s in skipped:
        out.append(f"| {s['model']} | {s['cohort']} | {s['why']} |" + " |" * 6)
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Round time vs C (log-log, with a linear reference) and peak RSS vs C, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.5))
    for model in sorted({r["model"] for r in rows}):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["cohort"])
        cs = [r["cohort"] for r in mine]
        ts = [r["median_round_s"] for r in mine]
        (line,) = ax_t.plot(cs, ts, "o-", label=f"R1-{model} engine (median round)")
        base = mine[0]
        ax_t.plot(
            cs,
            [base["median_round_s"] * c / base["cohort"] for c in cs],
            "--",
            color=line.get_color(),
            alpha=0.6,
            label=f"R1-{model}: linear in C from C={base['cohort']}",
        )
        ax_m.plot(cs, [r["peak_rss_mib"] for r in mine], "o-", color=line.get_color(), label=model)
        ax_m.plot(
            cs,
            [r["rss_after_setup_mib"] for r in mine],
            ":",
            color=line.get_color(),
            label=f"{model}: RSS after setup (data, device copy)",
        )
    ax_t.set(xscale="log", yscale="log", xlabel="cohort size C", ylabel="round time (s)")
    ax_t.set_title("Round time vs C (log-log)")
    ax_m.set(xscale="log", xlabel="cohort size C", ylabel="peak RSS (MiB)")
    ax_m.set_title("Peak RSS of the process vs C")
    for ax in (ax_t, ax_m):
        cs = sorted({r["cohort"] for r in rows})
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    ax_m.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0]
    )
    p.add_argument("--models", nargs="+", choices=("mlp", "cnn"), default=["mlp"])
    p.add_argument("--cohorts", nargs="+", type=int, default=list(DEFAULT_COHORTS))
    p.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK,
        help="engine chunk (0: automatic, from the memory budget)",
    )
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after 1 warm-up round")
    p.add_argument("--matmul-reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help=f"JSON file (default {DEFAULT_OUT})")
    p.add_argument("--plot", type=Path, default=None, help=f"PNG file (default {DEFAULT_PLOT})")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    p.add_argument(
        "--max-config-s",
        type=float,
        default=None,
        help="skip a C (and larger ones) whose predicted wall time, extrapolated linearly from "
        "the previous C, exceeds this many seconds",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: mlp, C = 8, 16, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.cohorts, args.rounds = ["mlp"], [8, 16], 1
        args.chunk_size, args.matmul_reps = 8, 1
    out = args.out or r1.ROOT / (QUICK_OUT if args.quick else DEFAULT_OUT)
    plot_path = args.plot or r1.ROOT / (QUICK_PLOT if args.quick else DEFAULT_PLOT)

    t_start = time.perf_counter()
    rows, skipped, errors = [], [], []
    for model in args.models:
        prev = None
        for cohort in sorted(args.cohorts):
            label = f"{model} C={cohort}"
            if prev is not None and args.max_config_s is not None:
                guess = predicted_s(prev, cohort, args.rounds)
                if guess > args.max_config_s:
                    why = (
                        f"skipped: predicted {guess:.0f} s > --max-config-s {args.max_config_s:.0f}"
                    )
                    for c in (c for c in sorted(args.cohorts) if c >= cohort):
                        skipped.append({"model": model, "cohort": c, "why": why})
                    r1._log(f"{label} and larger: {why}")
                    break
            t0 = time.perf_counter()
            row, err = r1.run_subprocess(
                r1.one_args(
                    model, cohort, "engine", args.chunk_size, args.rounds, args.matmul_reps
                ),
                args.timeout,
            )
            wall = time.perf_counter() - t0
            if row is None:
                r1._log(f"{label}: FAILED ({err.splitlines()[0] if err else ''})")
                errors.append({"model": model, "cohort": cohort, "error": err})
                skipped.append({"model": model, "cohort": cohort, "why": "failed"})
                break
            prev = {**summarize(row), "wall_s": wall}
            rows.append(prev)
            r1._log(
                f"{label}: median round {row['median_round_s']:.3f} s, "
                f"{row['updates_per_s']:.1f} updates/s, peak RSS {row['peak_rss_mib']:.0f} MiB "
                f"({wall:.0f} s)"
            )
    add_scaling(rows)

    command = "python -m benchmarks.scaling " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = r1.machine()
    result = {
        "benchmark": "R1 scaling (engine)",
        "command": command,
        "workload": {
            "r1": "see benchmarks/r1.py; population max(1024, C), 32 examples per client",
            "algorithm": repr(r1._config(0, args.chunk_size or None)).replace(
                "cohort_size=0", "cohort_size=C"
            ),
            "models": {m: r1.MODEL_KWARGS[m] for m in args.models},
            "rounds_timed": args.rounds,
            "chunk_size": args.chunk_size or "auto",
        },
        "machine": machine,
        "rows": rows,
        "skipped": skipped,
        "errors": errors,
        "wall_s": time.perf_counter() - t_start,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows, skipped))
    if rows and not args.no_plot:
        loads = [r["loadavg_1min_start"] for r in rows]
        title = (
            f"R1 engine scaling, chunk {args.chunk_size or 'auto'}, median of "
            f"{args.rounds} timed round(s); {machine.get('cpu_count')} CPUs, jax {machine['jax']}; "
            f"1-min load at start {min(loads):.1f}-{max(loads):.1f}"
        )
        plot(rows, plot_path, title)
        print(f"\nwrote {plot_path}")
    print(f"wrote {out} (total {result['wall_s']:.0f} s)")
    return 0 if rows and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
