"""What every job in this directory shares: a YAML config plus `--set` overrides, derta.preflight
at config load (before Ray), `--plan`, Ray started with the project's runtime env, and the exit
codes of the `derta` command (0 success, 1 failure or a plan that does not fit, 2 bad config).
The job files only name a config and a pipeline function. Import this after putting platform/
on sys.path (each job does it first).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterable

from derta.config import ConfigError, ExperimentConfig, load_config
from derta.preflight import check

CONFIGS = Path(__file__).resolve().parent / "configs"


def parse_args(argv: list[str] | None, default_config: Path, doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0], epilog="\n".join(doc.strip().splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default=str(default_config), help=f"experiment YAML (default: {default_config.name})")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set train.lr=1e-4 storage.root=s3://b/runs (repeatable)")
    p.add_argument("--twin", metavar="DIR",
                   help="run the job's CPU twin: the same config with a stand-in model, synthetic data in the same "
                        "formats, small sizes and CPU resources, under DIR (derta/twin.py); --set applies on top")
    p.add_argument("--plan", action="store_true",
                   help="print resources and the per-GPU memory estimate, then exit (1 if it cannot fit); asks Ray for nothing")
    return p.parse_args(argv)


def main(run: Callable[[ExperimentConfig], object], config: str | Path, doc: str, *,
         stages: Iterable[str] = ("train", "eval"), plan: Callable[[ExperimentConfig], bool] | None = None,
         argv: list[str] | None = None) -> int:
    """Load the config, then either print the plan or connect to Ray and run `run(cfg)`."""
    default = Path(config) if Path(config).is_absolute() else CONFIGS / config
    args = parse_args(argv, default, doc)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.twin:
            from derta.twin import cpu_twin

            cfg = cpu_twin(cfg, args.twin, args.overrides)
        for note in check(cfg, tuple(stages), planning=args.plan):  # before Ray: exit 2 for what would fail later
            print(f"note: {note}", file=sys.stderr)
        if args.plan:
            if plan is not None:
                return 0 if plan(cfg) else 1
            from derta.plan import print_plan

            return 0 if print_plan(cfg, tuple(stages)) else 1
        from derta.runtime_env import init_ray

        init_ray(cfg)
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a job's last line of defence: say what failed, exit 1
        traceback.print_exc()
        print(f"failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0
