"""Seeds of the science check -> the README's table: mean (min-max) per cell, and per finding
the number of seeds where it holds.

    python benchmarks/science/aggregate.py RUNS/s0/position_bias.json RUNS/s1/... RUNS/s2/...
"""

from __future__ import annotations

import json
import sys

ARMS = {"vanilla": "Vanilla", "recaug": "+ Harmful prefix", "rto": "+ RTO", "derta": "DeRTa (both)"}


def cell(values: list[float]) -> str:
    mean = sum(values) / len(values)
    lo, hi = min(values), max(values)
    return f"{mean:.1f}" if round(lo) == round(hi) else f"{mean:.1f} ({lo:.0f}–{hi:.0f})"


def main(paths: list[str]) -> None:
    runs = [json.load(open(p)) for p in paths]
    ks = sorted(runs[0]["results"]["vanilla"]["asr"]["heldout"], key=int)
    head = [f"held-out k={k}" for k in ks] + [f"seen k={k}" for k in ks]
    print("| arm | " + " | ".join(head) + " | helpfulness | helpful prompts refused % | refusals opening the response % |")
    print("|---" * (len(head) + 4) + "|")
    for arm, name in ARMS.items():
        res = [r["results"][arm] for r in runs]
        cells = [cell([x["asr"][g][k] for x in res]) for g in ("heldout", "seen") for k in ks]
        cells += [cell([x["helpfulness"] for x in res]), cell([x["help_refusal"] for x in res]),
                  cell([x["at_start"] for x in res])]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    claims = [f["claim"] for f in runs[0]["findings"]]
    for c in claims:
        hold = [next(f for f in r["findings"] if f["claim"] == c) for r in runs]
        print(f"- {sum(f['holds'] for f in hold)}/{len(runs)}  {c}")
        for f in hold:
            print(f"    {f['detail']}")
    print()
    print("wall time per seed (s):", [round(r["seconds"]) for r in runs])


if __name__ == "__main__":
    main(sys.argv[1:])
