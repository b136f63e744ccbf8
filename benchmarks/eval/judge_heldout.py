"""The pattern judge out of sample: `derta judge` (RefusalJudge, no model) on released generation
files of the paper's repository that were NOT used while its rules were written, against the ASR
the paper reports for them (GPT-4 judge).

    python benchmarks/eval/judge_heldout.py --repo PATH/TO/RobustNLP/DeRTa

Development files (benchmarks/eval/RESULTS.md section 2): LLaMA3-70B LoRA Vanilla and DeRTa on
every attack, and PAIR of the "+ harmful prefix" (recaug) model. Held out here: every other file
whose model has a number in the paper (main_results.png = Table 2, PAPER.md's Table 4 rows).
The paper's numbers are typed in below with their row; nothing is fitted to them.
"""

from __future__ import annotations

import argparse
import json
import os
from statistics import mean

from derta.eval.judge_file import judge_file

# (attack, model label, file under results/safety/, paper ASR, paper row)
HELDOUT = [
    ("CodeAttack", "GPT-4", "codeattack/eval_codeattack_200_gpt-4-turbo-2024-04-09.json", 82.5, "Table 2 GPT-4"),
    ("PAIR", "GPT-4", "pair/PAIR_result_gpt-4-turbo-2024-04-09.json", 40.0, "Table 2 GPT-4"),
    ("JailbreakChat", "GPT-4", "jailbreakchat/eval_jailbreakchat_200_gpt-4-turbo-2024-04-09.json", 4.0, "Table 2 GPT-4"),
    ("SelfCipher", "GPT-4", "selfcipher/eval_selfcipher_200_gpt-4-turbo-2024-04-09.json", 6.5, "Table 2 GPT-4"),
    ("CodeAttack", "ChatGPT", "codeattack/eval_codeattack_200_gpt-3.5-turbo-0125.json", 85.0, "Table 2 ChatGPT"),
    ("PAIR", "ChatGPT", "pair/PAIR_result_gpt-3.5-turbo-0125.json", 82.0, "Table 2 ChatGPT"),
    ("JailbreakChat", "ChatGPT", "jailbreakchat/eval_jailbreakchat_200_gpt-3.5-turbo-0125.json", 29.0, "Table 2 ChatGPT"),
    ("SelfCipher", "ChatGPT", "selfcipher/eval_selfcipher_200_gpt-3.5-turbo-0125.json", 81.0, "Table 2 ChatGPT"),
    ("CodeAttack", "70B-Instruct", "codeattack/eval_codeattack_200_Llama-3-70B-Instruct.json", 80.5, "Table 2 70B-Instruct Vanilla"),
    ("PAIR", "70B-Instruct", "pair/PAIR_result_gpt-llama-3-70B-Instruct.json", 36.0, "Table 2 70B-Instruct Vanilla"),
    ("JailbreakChat", "70B-Instruct", "jailbreakchat/eval_jailbreakchat_200_Llama-3-70B-Instruct.json", 3.0, "Table 2 70B-Instruct Vanilla"),
    ("SelfCipher", "70B-Instruct", "selfcipher/eval_selfcipher_200_Llama-3-70B-Instruct.json", 0.0, "Table 2 70B-Instruct Vanilla"),
    ("AutoDAN", "70B-Instruct", "autodan/autodan_llama-3-70B-Instruct_50_Llama-3-70B-Instruct.json", 0.0, "Table 2 70B-Instruct Vanilla"),
    ("CodeAttack", "70B-Instruct DeRTa", "codeattack/lora_Llama-3-70B-Instruct_derta_eval_codeattack_200.json", 5.5, "Table 2 70B-Instruct Ours"),
    ("PAIR", "70B-Instruct DeRTa", "pair/PAIR_result_llama-3-70B-ins-ours.json", 2.0, "Table 2 70B-Instruct Ours"),
    ("JailbreakChat", "70B-Instruct DeRTa", "jailbreakchat/lora_Llama-3-70B-Instruct_derta_eval_jailbreakchat_200.json", 0.0, "Table 2 70B-Instruct Ours"),
    ("SelfCipher", "70B-Instruct DeRTa", "selfcipher/lora_Llama-3-70B-Instruct_derta_eval_selfcipher_200.json", 0.0, "Table 2 70B-Instruct Ours"),
    ("Completion", "70B-Instruct DeRTa", "completionattack/lora_Llama-3-70B-Instruct_derta_eval_completionattack_200.json", 5.5, "Table 2 70B-Instruct Ours"),
    ("AutoDAN", "70B-Instruct DeRTa", "autodan/lora_Llama-3-70B-Instruct_ours_autodan_llama-3-70B-ins-ours_50.json", 0.0, "Table 2 70B-Instruct Ours"),
    ("JailbreakChat", "70B +harmful prefix", "jailbreakchat/lora_Llama-3-70B-recaug_eval_jailbreakchat_200.json", 35.5, "Table 4 + Harmful prefix"),
    ("SelfCipher", "70B +harmful prefix", "selfcipher/lora_Llama-3-70B-recaug_eval_selfcipher_200.json", 21.5, "Table 4 + Harmful prefix"),
    ("Completion", "70B +harmful prefix", "completionattack/lora_Llama-3-70B-recaug_eval_completionattack_200.json", 25.0, "Table 4 + Harmful prefix"),
    ("AutoDAN", "70B +harmful prefix", "autodan/lora_Llama-3-70B-recaug_autodan_llama-3-70B-recaug_50.json", 36.0, "Table 4 + Harmful prefix"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True, help="a checkout of github.com/RobustNLP/DeRTa")
    a = ap.parse_args()
    rows = []
    for attack, model, rel, paper, row in HELDOUT:
        path = os.path.join(a.repo, "results", "safety", rel)
        if not os.path.isfile(path):
            print(json.dumps({"attack": attack, "model": model, "missing": rel}))
            continue
        s = judge_file(path, None, "refusal")
        rows.append({"attack": attack, "model": model, "n": s["n"], "ours": s["asr"], "lenient": s["asr_lenient"],
                     "paper": paper, "diff": round(s["asr"] - paper, 1), "paper_row": row, "file": rel})
        print(json.dumps(rows[-1]))
    if rows:
        by_attack: dict[str, list[float]] = {}
        for r in rows:
            by_attack.setdefault(r["attack"], []).append(abs(r["diff"]))
        print(json.dumps({"cells": len(rows), "mean_abs_diff": round(mean(abs(r["diff"]) for r in rows), 1),
                          "mean_abs_diff_by_attack": {k: round(mean(v), 1) for k, v in by_attack.items()},
                          "within_10_points": sum(abs(r["diff"]) <= 10 for r in rows)}))


if __name__ == "__main__":
    main()
