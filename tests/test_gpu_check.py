"""benchmarks/gpu/run.sh in its dry mode (what a CPU machine runs): configs built and validated,
the HF side generating on the tiny model, the JSON valid against the check's schema; and the
parity measure, which must fail on mismatched pairs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_mode_writes_a_valid_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--dry", str(out)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "dry" and doc["schema_problems"] == [] and _module().validate(doc) == []
    parts = doc["parts"]
    assert parts["configs"]["status"] == "ok" and parts["hf_generate"]["status"] == "ok"
    assert parts["hf_generate"]["gen_per_s"] > 0 and parts["model"]["params"] > 0
    pc = parts["configs"]["processor_config"]
    assert not pc["tokenize_stage"] and not pc["chat_template_stage"] and pc["should_continue_on_error"]
    assert {parts[k]["status"] for k in ("train", "vllm_generate", "parity", "eval")} == {"skipped"}


def test_schema_catches_bad_documents_and_parity_can_fail():
    g = _module()
    assert any("missing" in p for p in g.validate({"mode": "dry"}))
    doc = {"mode": "gpu", "started_utc": "t", "device": "d", "vllm_version": None,
           "parts": {k: {"status": "ok", "seconds": 1.0} for k in g.SCHEMA["parts"]}}
    doc["parts"]["model"]["params"] = 5
    doc["parts"]["configs"].update(processor_config={}, train_config_ok=True)
    assert g.validate(doc) == []
    doc["parts"]["eval"]["status"] = "fine"
    assert g.validate(doc) == ["$.parts.eval.status: 'fine' not one of ('ok', 'skipped', 'failed')"]
    a = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    assert g.parity(a, a, 4)["passes"] and g.parity(a, a, 4)["exact_match"] == 1.0
    assert not g.parity(a, a[1:] + a[:1], 4)["passes"]  # the control: mismatched pairs fail
    late = [[1, 2, 3, 0], [5, 6, 7, 0], [9, 9, 9, 0]]  # differ only at the last of 4 tokens
    r = g.parity(a, late, 4)
    assert r["first_token_agree"] == 1.0 and r["common_prefix_frac"] == 0.75 and not r["passes"]
