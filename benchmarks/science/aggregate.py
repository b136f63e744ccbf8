"""Seeds of the science check -> the README's tables: mean (min-max) per cell, and per
pre-registered finding its verdict on every seed.

    python benchmarks/science/aggregate.py RUNS/s0/position_bias.json RUNS/s1/... RUNS/s2/...
"""

from __future__ import annotations

import json
import sys

ARMS = {"base": "Base (before safety tuning)", "vanilla": "Vanilla", "recaug": "+ Harmful prefix", "rto": "+ RTO",
        "derta": "DeRTa (both)"}
GROUPS = {"heldout": "held-out", "seen": "seen", "unlike": "unlike"}


def cell(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    lo, hi = min(vals), max(vals)
    return f"{mean:.1f}" if round(lo) == round(hi) else f"{mean:.1f} ({lo:.0f}–{hi:.0f})"


def _results(run: dict, arm: str) -> dict | None:
    return run.get("base") if arm == "base" else run["results"].get(arm)


def main(paths: list[str]) -> None:
    runs = [json.load(open(p)) for p in paths]
    ks = sorted(runs[0]["results"]["vanilla"]["asr"]["heldout"], key=int)
    head = [f"{GROUPS[g]} k={k}" for g in GROUPS for k in ks]
    tail = ["completion ASR", "helpfulness", "helpful prompts refused %", "completion refusals",
            "refusals at word 0 %", "refusals at word >= 5 %"]
    print("| arm | " + " | ".join(head + tail) + " |")
    print("|---" * (len(head) + len(tail) + 1) + "|")
    for arm, name in ARMS.items():
        res = [_results(r, arm) for r in runs]
        if any(x is None for x in res):
            continue
        cells = [cell([x["asr"].get(g, {}).get(k) for x in res]) for g in GROUPS for k in ks]
        cells += [cell([x["completion_asr"] for x in res]), cell([x["helpfulness"] for x in res]),
                  cell([x["help_refusal"] for x in res]), cell([float(len(x["positions"])) for x in res]),
                  cell([x["at_start"] for x in res]), cell([x["after_text"] for x in res])]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("| finding | rule | " + " | ".join(f"seed {r['config']['position_bias']['seed']}" for r in runs) + " | holds |")
    print("|---|---|" + "---|" * len(runs) + "---|")
    for f0 in runs[0]["findings"]:
        per = [next((f for f in r["findings"] if f["name"] == f0["name"]), None) for r in runs]
        verdicts = ["-" if f is None else ("holds" if f["holds"] else "**no**") for f in per]
        n = sum(bool(f and f["holds"]) for f in per)
        print(f"| `{f0['name']}` {f0['claim']} | {f0['rule']} | " + " | ".join(verdicts) + f" | {n}/{len(runs)} |")
    print()
    for f0 in runs[0]["findings"]:
        print(f"- `{f0['name']}`")
        for r in runs:
            f = next((f for f in r["findings"] if f["name"] == f0["name"]), None)
            if f is not None:
                print(f"    seed {r['config']['position_bias']['seed']}: {f['detail']}")
    print()
    print("wall time per seed (s):", [round(r["seconds"]) for r in runs],
          " per stage:", [{k: round(v) for k, v in r["timings"].items()} for r in runs])


if __name__ == "__main__":
    main(sys.argv[1:])
