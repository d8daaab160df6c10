"""Command line: ``fedjax-dp run|audit|sweep CONFIG [--section.option VALUE ...]``.

- ``fedjax-dp run CONFIG``: train, evaluate, account (and, with ``privacy.attack``, attack).
- ``fedjax-dp audit CONFIG``: train the same run with canary clients and print the accounted
  epsilon next to the audited lower bound (:func:`fedjax_dp.audit.run_audit`); options of
  the ``[audit]`` section (``--audit.canaries``, ``--audit.noise_multipliers``...) set it up.
- ``fedjax-dp sweep CONFIG``: a privacy-utility grid (noise multipliers x seeds, optionally
  clip norms, learning rates and any declared hparam, ``sweep.grid``) run as one vectorised
  simulation (:func:`fedjax_dp.sweep.run_sweep`); options of the ``[sweep]`` section set it.
- ``fedjax-dp hparams CONFIG``: the round's traced hyper-parameters (name, value, domain,
  help), as its stages declare them (:mod:`fedjax_dp.core.hparams`).

Every option of the config file can be given on the command line, where it overrides the
file; ``fedjax-dp run --help`` lists them all with their defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

_SENTINEL = object()


def _build_parser() -> argparse.ArgumentParser:
    from fedjax_dp.runner import experiment

    parser = argparse.ArgumentParser(
        prog="fedjax-dp", description="Simulate federated learning with differential privacy."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="train with a config file (TOML or YAML)",
        description="Train with a config file; any option below overrides the file.",
    )
    audit = sub.add_parser(
        "audit",
        help="audit the config's privacy with canary clients (empirical epsilon lower bound)",
        description=(
            "Train the config's run with canary clients (one-run audit, Steinke, Nasr, "
            "Jagielski 2023) and print the accounted epsilon, the audited lower bound and the "
            "correct guesses (plus the membership attack with privacy.attack); writes a JSON. "
            "Any option below overrides the file; [audit] options set up the audit."
        ),
    )
    sweep = sub.add_parser(
        "sweep",
        help="privacy-utility sweep: a grid of noise multipliers x seeds in one vmapped run",
        description=(
            "Run a grid of noise multipliers x seeds (optionally clip norms and learning "
            "rates, [sweep] options) as one vectorised simulation: every point trains "
            "run.rounds rounds of the config's algorithm on the same data. Writes sweep.csv, "
            "sweep.json, points.jsonl and accuracy_vs_epsilon.png to sweep.output and prints "
            "a table. Any option below overrides the file."
        ),
    )
    hparams = sub.add_parser(
        "hparams",
        help="list the round's traced hyper-parameters (what sweep.grid can sweep)",
        description=(
            "Build the config's round (no training) and print every hyper-parameter its "
            "stages declare: name, the value the run uses, domain and help. They are traced: "
            "changing one never recompiles, and sweep.grid can sweep any of them."
        ),
    )
    defaults = experiment.ExperimentConfig()
    for command in (run, audit, sweep, hparams):
        command.add_argument(
            "config", nargs="?", help="experiment file (.toml, .yaml); omit for defaults"
        )
        for section in experiment.SECTIONS:
            group = command.add_argument_group(f"[{section}]")
            for f in dataclasses.fields(getattr(defaults, section)):
                t = experiment.option_type(section, f.name)
                metavar = {int: "INT", float: "FLOAT", bool: "BOOL", list: "LIST"}.get(t, "STR")
                default = getattr(getattr(defaults, section), f.name)
                text = f"{experiment.option_help(section, f.name)} (default: {default!r})"
                group.add_argument(
                    f"--{section}.{f.name}",
                    dest=f"{section}.{f.name}",
                    default=_SENTINEL,
                    metavar=metavar,
                    help=text.replace("%", "%%"),  # argparse %-formats help strings
                )
        for action in command._actions:
            if action.default is _SENTINEL:
                action.default = argparse.SUPPRESS
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    from fedjax_dp.runner import experiment

    cfg = None
    try:
        cfg = experiment.load_config(args.config, overrides)
        if args.command == "audit":
            from fedjax_dp.privacy import audit

            audit.run_audit(cfg)
        elif args.command == "sweep":
            from fedjax_dp.runner import sweep

            sweep.run_sweep(cfg)
        elif args.command == "hparams":
            experiment.describe_hparams(cfg)
        else:
            experiment.run(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"fedjax-dp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "run" and cfg is not None and cfg.run.checkpoint_every > 0:
            kept = "checkpoints written so far are kept (run the same command to resume)"
        elif args.command == "run" and cfg is not None:
            kept = "run.checkpoint_every = 0: nothing to resume from, the run starts over"
        else:
            kept = "nothing to resume from; run the command again"
        print(f"fedjax-dp: interrupted; {kept}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
