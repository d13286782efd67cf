"""The entry point every paper shares: `python -m papers.<slug> {train,eval,reproduce} [--profile] [--set k=v]`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from .config import PROFILES, describe, load_config

Command = Callable[[dict], object]


def run_cli(slug: str, config_path: str | Path, commands: dict[str, Command], description: str,
            argv: list[str] | None = None) -> object:
    """Parse arguments, resolve the config and run one command. `commands` maps train/eval/reproduce
    (and any extra command) to a function of the resolved config."""
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
    args = parser.parse_args(argv)
    try:
        cfg = load_config(config_path, args.profile, args.overrides)
    except (KeyError, ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.print_config:
        print(json.dumps(cfg, indent=1, default=str))
        return cfg
    t0 = time.time()
    result = commands[args.command](cfg)
    print(f"[{slug}] {args.command} ({args.profile}) done in {time.time() - t0:.1f}s", file=sys.stderr)
    return result
