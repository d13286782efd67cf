"""The entry point every paper shares: `python -m papers.<slug> {train,eval,reproduce} [--profile] [--set k=v]`.

Bad input gets one line, early: the config is resolved and type-checked, then `common.validate.check_run` checks
option ranges and names, the datasets the command reads (folder, layout, every image) and the CLIP weights, all
before any model is loaded. Any error a user can fix (`common.errors.UserError`) is printed as one line naming
the problem and the fix, exit status 2; anything else as one line with its type and a hint to rerun with
`--debug`, which shows the traceback, exit status 1.

At scale (README 'Running at scale'): `--launcher slurm|submitit-local` splits the grid of train/eval/reproduce
into jobs (`common.launch`) instead of running it here, after the same checks; under `torchrun` every rank runs
the command data-parallel (`common.engine.distributed`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from .config import PROFILES, describe, load_config, read_paper_config
from .engine import distributed
from .engine.train import restarting
from .errors import ConfigError, UserError, one_line
from .launch.launcher import LAUNCHERS, LaunchOptions, job_argv
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
    _scale_options(parser)
    args = parser.parse_args(argv)
    prog = parser.prog
    say = lambda m: print(f"[{slug}] {m}", file=sys.stderr)  # noqa: E731
    try:
        cfg = load_config(config_path, args.profile, args.overrides)
        if args.print_config:
            print(json.dumps(cfg, indent=1, default=str))
            return cfg
        opts = _launch_options(args)
        reads, weights = _inputs_of(args.command, commands[args.command])
        cfg = check_run(cfg, reads, weights, validate, say=say)
        t0 = time.time()
        if opts is not None:
            from .launch import launch
            unused = tuple(read_paper_config(config_path).get("unused") or {})
            return launch(slug, args.command, cfg, job_argv(args.command, args.profile, args.overrides, args.debug),
                          opts, unused, say=lambda m: print(m, file=sys.stderr))
        if distributed.launched():
            cfg["device"] = distributed.init_from_env(str(cfg.get("device", "cpu")))
            say(f"data parallel: rank {distributed.rank()} of {distributed.world_size()} on {cfg['device']}")
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


def _scale_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("running at scale (README 'Running at scale'; `local` runs here, in this process)")
    g.add_argument("--launcher", default="local", choices=LAUNCHERS,
                   help="submitit-local: jobs as local processes; slurm: a Slurm job array (submitit)")
    g.add_argument("--jobs", type=int, help="split the grid (datasets x shots x seeds) into this many jobs "
                                            "(default: one per cell)")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--gpus-per-job", type=int, help="GPUs per job (more than one: data parallel inside the job)")
    g.add_argument("--cpus-per-job", type=int, help="CPU cores per job")
    g.add_argument("--mem-gb", type=float, help="memory per job (GB)")
    g.add_argument("--time", type=int, help="minutes per job (past it a job is requeued and resumes; default 60)")
    g.add_argument("--parallel", type=int, help="at most this many jobs running at once (Slurm array limit)")
    g.add_argument("--launch-profile", metavar="FILE", help="YAML with any of these options (the command line "
                                                            "wins), plus account, qos, setup, slurm: {...}")
    g.add_argument("--wait", action="store_true", help="wait for the jobs (submitit-local always waits)")


SCALE_KEYS = ("jobs", "partition", "gpus_per_job", "cpus_per_job", "mem_gb", "time", "parallel", "launch_profile")


def _launch_options(args) -> LaunchOptions | None:
    """The launch options, checked (None for an in-process run); launch options without a launcher are refused."""
    given = [k for k in SCALE_KEYS if getattr(args, k) is not None] + (["wait"] if args.wait else [])
    if args.launcher == "local":
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} needs --launcher slurm or submitit-local (the default "
                              f"`local` runs the whole grid in this process)")
        return None
    from .launch.launcher import check_command
    check_command(args.command, LaunchOptions(launcher=args.launcher))
    if distributed.launched():
        raise ConfigError("--launcher submits jobs; run it once, not under torchrun (give --gpus-per-job N for "
                          "data-parallel jobs)")
    return LaunchOptions.build(args.launch_profile, launcher=args.launcher, wait=args.wait or None,
                               **{k: getattr(args, k) for k in SCALE_KEYS if k != "launch_profile"})


def _fail(prog: str, message: str, status: int, debug: bool) -> None:
    if debug:
        raise
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    sys.exit(status)
