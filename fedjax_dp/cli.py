"""Command line: ``fedjax-dp run CONFIG [--section.option VALUE ...]``.

Every option of the config file can be given on the command line, where it overrides the
file; ``fedjax-dp run --help`` lists them all with their defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

_SENTINEL = object()


def _build_parser() -> argparse.ArgumentParser:
    from fedjax_dp import experiment

    parser = argparse.ArgumentParser(
        prog="fedjax-dp", description="Simulate federated learning with differential privacy."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="train with a config file (TOML or YAML)",
        description="Train with a config file; any option below overrides the file.",
    )
    run.add_argument("config", nargs="?", help="experiment file (.toml, .yaml); omit for defaults")
    defaults = experiment.ExperimentConfig()
    for section in experiment.SECTIONS:
        group = run.add_argument_group(f"[{section}]")
        for f in dataclasses.fields(getattr(defaults, section)):
            t = experiment.option_type(section, f.name)
            metavar = {int: "INT", float: "FLOAT", bool: "BOOL", list: "LIST"}.get(t, "STR")
            default = getattr(getattr(defaults, section), f.name)
            group.add_argument(
                f"--{section}.{f.name}",
                dest=f"{section}.{f.name}",
                default=_SENTINEL,
                metavar=metavar,
                help=f"{experiment.option_help(section, f.name)} (default: {default!r})",
            )
    for action in run._actions:
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
    from fedjax_dp import experiment

    try:
        cfg = experiment.load_config(args.config, overrides)
        experiment.run(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"fedjax-dp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedjax-dp: interrupted; metrics written so far are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
