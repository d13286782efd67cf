"""The entry point every paper shares: `python -m papers.<slug> {train,eval,reproduce} [--profile] [--set k=v]`.

Bad input gets one line, early: the config is resolved and type-checked, then `common.validate.check_run` checks
option ranges and names, the datasets the command reads (folder, layout, every image) and the CLIP weights, all
before any model is loaded. Any error a user can fix (`common.errors.UserError`) is printed as one line naming
the problem and the fix, exit status 2; anything else as one line with its type and a hint to rerun with
`--debug`, which shows the traceback, exit status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from .config import PROFILES, describe, load_config
from .engine.train import restarting
from .errors import UserError, one_line
from .validate import DatasetsOf, check_run

Command = Callable[[dict], object]
# What a command reads unless it says otherwise (`inputs`): train/eval the `datasets`, reproduce every dataset
# option, other commands (cost, plot, figure) neither data nor weights.
DEFAULT_INPUTS = {"train": (("datasets",), True), "eval": (("datasets",), True),
                  "reproduce": (("datasets", "dg_source", "dg_targets", "xd_source"), True)}


def inputs(*dataset_keys: str, datasets: DatasetsOf | None = None, weights: bool = True):
    """Declare what a command reads, so the CLI checks exactly that before it runs: the datasets named by these
    config keys (or returned by `datasets(cfg)`) and, with `weights`, the CLIP weights of `arch` / `pretrained`."""
    def deco(fn: Command) -> Command:
        fn.inputs = (datasets or dataset_keys, weights)
        return fn
    return deco


def _inputs_of(name: str, command: Command) -> tuple[Iterable[str] | DatasetsOf, bool]:
    return getattr(command, "inputs", None) or DEFAULT_INPUTS.get(name, ((), False))


def run_cli(slug: str, config_path: str | Path, commands: dict[str, Command], description: str,
            argv: list[str] | None = None, validate: Callable[[dict], list[str]] | None = None) -> object:
    """Parse arguments, resolve and check the config, and run one command. `commands` maps train/eval/reproduce
    (and any extra command) to a function of the resolved config; `validate(cfg)` returns the paper's own
    problems with a config (empty when all is well)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m papers.{slug}", description=description,
        epilog=describe(config_path), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(commands), help="what to run: " + ", ".join(
        f"{k}: {(v.__doc__ or '').strip().splitlines()[0] if v.__doc__ else ''}" for k, v in sorted(commands.items())))
    parser.add_argument("--profile", default="embedded", choices=PROFILES,
                        help="embedded: the project's own world and tiny CLIPs (default, offline); "
                             "real: open_clip weights and real datasets under data_root")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config option (repeatable); see the options below")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        cfg = load_config(config_path, args.profile, args.overrides)
        if args.print_config:
            print(json.dumps(cfg, indent=1, default=str))
            return cfg
        reads, weights = _inputs_of(args.command, commands[args.command])
        cfg = check_run(cfg, reads, weights, validate, say=lambda m: print(f"[{slug}] {m}", file=sys.stderr))
        t0 = time.time()
        with restarting(bool(cfg.get("force"))):
            result = commands[args.command](cfg)
    except KeyboardInterrupt:
        _fail(prog, "interrupted; rerun the same command to resume where it stopped", 130, args.debug)
    except UserError as err:
        _fail(prog, str(err), 2, args.debug)
    except Exception as err:  # a bug or the environment: still one line, the traceback on request
        _fail(prog, f"{type(err).__name__}: {err} (unexpected; rerun with --debug for the traceback)", 1, args.debug)
    print(f"[{slug}] {args.command} ({args.profile}) done in {time.time() - t0:.1f}s", file=sys.stderr)
    return result


def _fail(prog: str, message: str, status: int, debug: bool) -> None:
    if debug:
        raise
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    sys.exit(status)
