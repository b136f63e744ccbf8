"""The `derta` command: VERB --config FILE.yaml [--set section.key=value ...].

Exit codes: 0 success, 2 bad config or input (the message names the file/field; derta.preflight
checks the model, tokenizer, data, attacks, judges, GPUs and storage at load, before Ray), 1 a
failure while running (the last stderr line names the original error, also one raised inside a
Ray actor or worker) or a plan that does not fit, 130 interrupted (Ctrl+C).
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from typing import Callable

from derta.config import PRESET_CONFIGS, RUN_DEFAULT_PRESET, ConfigError, ExperimentConfig, load_config, redact_text
from derta.preflight import check


def _common(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("--config", "-c", required=config_required, help="experiment YAML (default: the built-in demo)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set train.lr=1e-4 storage.root=./runs (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="derta", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    data = verbs.add_parser("data", help="data stages")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)
    _common(data_verbs.add_parser("build", help="build tokenized transition samples with Ray Data"))

    for name, text in [
        ("train", "train with Ray Train (FSDP, MLE + RTO)"),
        ("tune", "search prefix distributions and loss weights with Ray Tune"),
        ("eval", "attacks, judges and helpfulness on a trained model"),
        ("run", "data, train, eval and report in one go (no config: vanilla vs DeRTa from the shipped base)"),
        ("plan", "print the resolved config, resources and per-GPU memory estimate; do no work"),
        ("report", "render the HTML report of a run from MLflow"),
    ]:
        sub = verbs.add_parser(name, help=text)
        _common(sub)
        if name == "run":
            sub.add_argument("--preset", choices=sorted(PRESET_CONFIGS), default=None,
                             help="compare (the default without --config): vanilla vs DeRTa safety tuning of the "
                                  "shipped complying base, side by side; demo: one pipeline run (the default with "
                                  "--config); position_bias: the science check (pretraining + the four arms of the "
                                  "paper's Table 4, refusal positions of its Fig. 4)")
        if name == "report":
            sub.add_argument("--all", dest="all_runs", action="store_true",
                             help="one page comparing every run of the experiment (default when storage.run_name is unset)")

    judge = verbs.add_parser("judge", help="judge existing generations (JSONL)")
    _common(judge)
    judge.add_argument("--input", "-i", required=True, help="JSONL of {question, response} or the paper's formats")
    judge.add_argument("--output", "-o", help="write one JSONL row per input with unsafe/refusal_pos/judge")
    return parser


def _cmd_data(cfg: ExperimentConfig, args) -> None:
    from derta.pipeline import build_data

    build_data(cfg)


def _cmd_train(cfg: ExperimentConfig, args) -> None:
    from derta.pipeline import train_only

    train_only(cfg)


def _cmd_tune(cfg: ExperimentConfig, args) -> None:
    from derta.tune.tuner import run_tune

    run_tune(cfg)


def _cmd_eval(cfg: ExperimentConfig, args) -> None:
    from derta.pipeline import eval_only

    eval_only(cfg)


def run_preset(args) -> str:
    """What `derta run` runs: --preset when given, else compare without --config, else the pipeline."""
    return args.preset or ("demo" if args.config else RUN_DEFAULT_PRESET)


def _cmd_run(cfg: ExperimentConfig, args) -> None:
    preset = run_preset(args)
    if preset == "compare":
        from derta.experiments.compare import run_compare

        run_compare(cfg)
        return
    if preset == "position_bias":
        from derta.experiments.position_bias import run_position_bias

        run_position_bias(cfg)
        return
    from derta.pipeline import run_all

    run_all(cfg)


def _cmd_plan(cfg: ExperimentConfig, args) -> None:
    from derta.plan import print_plan

    if not print_plan(cfg):
        raise SystemExit(1)


def _cmd_report(cfg: ExperimentConfig, args) -> None:
    from derta.pipeline import report_only

    report_only(cfg, all_runs=getattr(args, "all_runs", False))


def _cmd_judge(cfg: ExperimentConfig, args) -> None:
    from derta.eval.runner import judge_file

    judge_file(args.input, args.output, cfg)


# What each verb runs, for derta.preflight (train and tune build their data first).
STAGES: dict[str, tuple[str, ...]] = {
    "data": ("data",), "train": ("train",), "tune": ("tune",), "eval": ("eval",), "run": ("train", "eval"),
    "plan": ("train", "eval"), "report": (), "judge": ("judge",),
}

COMMANDS: dict[str, Callable] = {
    "data": _cmd_data, "train": _cmd_train, "tune": _cmd_tune, "eval": _cmd_eval, "run": _cmd_run,
    "plan": _cmd_plan, "report": _cmd_report, "judge": _cmd_judge,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        preset = run_preset(args) if args.verb == "run" else "demo"  # other verbs: the built-in demo
        cfg = load_config(args.config or PRESET_CONFIGS[preset], args.overrides)
        for note in check(cfg, STAGES[args.verb], planning=args.verb == "plan"):
            print(f"derta: note: {note}", file=sys.stderr)
        COMMANDS[args.verb](cfg, args)
    except ConfigError as e:
        print(redact_text(f"derta: error: {e}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # One line, no traceback: the stages' MLflow runs were marked KILLED on the way out.
        _end_ray()
        print("derta: interrupted (Ctrl+C); its open MLflow runs are marked KILLED; run the same command again "
              "to resume", file=sys.stderr)
        return INTERRUPTED
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        print(redact_text(traceback.format_exc()), file=sys.stderr, end="")
        _end_ray()
        print(redact_text(f"derta: failed: {original_error(e)}"), file=sys.stderr)
        return 1
    return 0


INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl+C


def _end_ray() -> None:
    """Disconnect from Ray (a local cluster stops) before the last line: the workers' log lines
    Ray still forwards (log_to_driver) would otherwise print after it."""
    if "ray" not in sys.modules:
        return
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


def _chain(e: BaseException) -> list[BaseException]:
    """e and what it wraps, outermost first: a RayTaskError's `cause`, Ray Train's per-worker
    failures (WorkerGroupError.worker_failures), chained `__cause__`."""
    out: list[BaseException] = []
    while isinstance(e, BaseException) and all(e is not x for x in out):
        out.append(e)
        failures = getattr(e, "worker_failures", None)
        nxt = next(iter(failures.values()), None) if isinstance(failures, dict) and failures else None
        e = nxt or getattr(e, "cause", None) or e.__cause__
    return out


def root_cause(e: BaseException) -> BaseException:
    """The innermost error object Ray handed back for e."""
    return _chain(e)[-1]


_CHAINED = re.compile(r"\n\s*(The above exception was the direct cause of the following exception|"
                      r"During handling of the above exception, another exception occurred):\s*\n")


def original_error(e: BaseException) -> str:
    """'Type: message' (first line) of the error that started it. An exception chained inside
    a Ray actor (Ray Data wraps a UDF's error in UserCodeException `from` it) reaches the
    driver as text only, Ray pickles the wrapper without its __cause__: then the first error of
    the remote traceback is the original."""
    for err in _chain(e):
        tb = getattr(err, "traceback_str", None) or str(err)  # Ray's errors print the remote traceback
        if isinstance(tb, str) and _CHAINED.search(tb):
            first = [ln.strip() for ln in _CHAINED.split(tb, maxsplit=1)[0].splitlines() if ln.strip()]
            if first:
                return first[-1]
    cause = root_cause(e)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


if __name__ == "__main__":
    sys.exit(main())
