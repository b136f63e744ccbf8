"""The shipped base model `builtin:demo-base`: a small Llama that complies with (synthetic)
harmful requests, so `derta run` can safety-tune it two ways and show the difference.

It is the science check's pretraining stage (derta.experiments.position_bias: builtin:small,
`sft` on helpful answers and harmful completions of every topic of the demo corpus) with the
settings of configs/compare.yaml (its train section, position_bias.pretrain_epochs/_lr, seed 0),
run through the real pipeline and saved in bf16 under platform/derta/assets/demo_base/ with the
tokenizer and a provenance file (demo_base.json). `derta run --preset compare --set
position_bias.base_model=null model.name_or_path=builtin:small` pretrains the same base inline. This script is the only way those weights
are made; rerun it whenever the demo corpus (derta.demo) or the pretraining settings change:

    PYTHONPATH=platform python -m derta.experiments.demo_base [--seed 0] [--out DIR]

Shipped rather than built on first use: pretraining takes minutes on 2 cores, which would more
than double a first `derta run`; the weights are ~1.4 MB in bf16.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from derta.models import SHIPPED, save_model_dir

DEMO_BASE = "builtin:demo-base"
ASSET_DIR = SHIPPED[DEMO_BASE]
PROVENANCE = "demo_base.json"
COMMAND = "PYTHONPATH=platform python -m derta.experiments.demo_base"
FROM = "builtin:small"  # the random-init 0.6M-parameter Llama the base is pretrained from


def corpus_fingerprint() -> str:
    """Hash of the pretraining rows the base learns (the demo corpus), to tell a stale base."""
    from derta.config import COMPARE_CONFIG, load_config
    from derta.experiments.position_bias import corpus_rows

    rows = corpus_rows(load_config(COMPARE_CONFIG).position_bias)["pretrain"]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def read_provenance(directory: str | Path = ASSET_DIR) -> dict[str, Any] | None:
    p = Path(directory) / PROVENANCE
    return json.loads(p.read_text()) if p.is_file() else None


def pretrain(root: str, seed: int = 0):
    """Run the science check's pretraining stage under `root`; the trained model's directory."""
    from derta import storage
    from derta.cluster import ensure_ray
    from derta.config import COMPARE_CONFIG, load_config
    from derta.experiments.position_bias import corpus_rows, pretrain_config, write_corpus
    from derta.pipeline import make_tracker, parent_run, run_paths, run_stages

    cfg = load_config(COMPARE_CONFIG, [f"storage.root={root}", "storage.run_name=demo-base", f"model.name_or_path={FROM}",
                                       "position_bias.base_model=null", f"position_bias.seed={seed}",
                                       "tracking.experiment=demo-base"])
    pb = cfg.position_bias
    paths = run_paths(cfg)
    ensure_ray(cfg)
    files = write_corpus(storage.join(paths.dir, "corpus"), corpus_rows(pb))
    pre_cfg = pretrain_config(cfg, pb, files)
    tracker = make_tracker(pre_cfg)
    with parent_run(pre_cfg, paths, "pretrain", tracker=tracker) as (_, run_id):
        summary = run_stages(pre_cfg, paths, tracker, run_id, evaluate=False)
    return summary.model_dir, pre_cfg


def export(model_dir: str, out: Path, provenance: dict[str, Any]) -> Path:
    """The trained model in bf16 (safetensors) + tokenizer + provenance at `out`, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(model_dir)
    provenance = {**provenance, "parameters": sum(p.numel() for p in model.parameters()), "dtype": "bfloat16"}
    return save_model_dir(model, tok, out, {PROVENANCE: json.dumps(provenance, indent=2) + "\n"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="data order and init draws of the pretraining (default 0)")
    p.add_argument("--out", default=str(ASSET_DIR), help="where the HF directory goes (default: the package's asset)")
    p.add_argument("--workdir", help="storage root of the pretraining run (default: a temporary directory)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    work = args.workdir or tempfile.mkdtemp(prefix="derta-demo-base-")
    model_dir, pre_cfg = pretrain(work, args.seed)
    from derta.pipeline import git_commit

    out = export(model_dir, Path(args.out), {
        "name": DEMO_BASE, "command": COMMAND + (f" --seed {args.seed}" if args.seed else ""), "seed": args.seed,
        "from": pre_cfg.model.name_or_path, "method": pre_cfg.train.method, "epochs": pre_cfg.train.epochs,
        "lr": pre_cfg.train.lr, "config_fingerprint": pre_cfg.fingerprint(), "corpus_fingerprint": corpus_fingerprint(),
        "git_commit": git_commit(), "seconds": round(time.perf_counter() - t0, 1),
    })
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"demo base: {out} ({size / 1e6:.2f} MB) in {time.perf_counter() - t0:.0f}s; pretraining run under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
