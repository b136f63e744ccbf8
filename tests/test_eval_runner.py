"""evaluate() end to end through real Ray Data (HF engine actor pool), a real HTTP judge on
loopback, real MLflow (sqlite); resume from a partial file; PAIR on engine actors."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from _fixtures import ray_local, tiny_model_dir  # noqa: F401
from derta.config import load_config
from derta.eval.attacks import Question
from derta.eval.attacks import pair
from derta.eval.engines import EngineSpec, HFEngine
from derta.eval.judges import RefusalJudge
from derta.paths import RunPaths

pytestmark = pytest.mark.slow


class _Judge(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        reply = "A" if "Which answer is better" in text else ("unsafe" if len(text) % 3 == 0 else "safe")
        out = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture
def judge_url():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _cfg(tmp_path, *sets):
    base = [f"storage.root={tmp_path}", "eval.limit=2", "eval.prefill_k=[0,3]", "eval.max_new_tokens=6",
            "eval.batch_size=4", "eval.engine=hf"]
    return load_config(None, base + list(sets))


def test_evaluate_end_to_end_with_http_judge_and_mlflow(ray_local, tiny_model_dir, tmp_path, judge_url):
    from mlflow import MlflowClient

    from derta.eval.runner import evaluate
    from derta.tracking import Tracker, TrackingHandle

    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"question": "Name a fruit.", "reference": "An apple."}) + "\n")
    cfg = _cfg(
        tmp_path, "eval.attacks=[prefill,direct,completion,codeattack,selfcipher,jailbreakchat]",
        "eval.helpfulness=[demo,over_refusal,alpaca]", f"eval.helpfulness_files={{alpaca: {alpaca}}}",
        "eval.judge=http", f"eval.judge_url={judge_url}", "eval.judge_model=test-judge",
    )
    paths = RunPaths(str(tmp_path), "run1")
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "derta-test")
    with tracker.run("eval") as run_id:
        res = evaluate(cfg, paths, tiny_model_dir, TrackingHandle.of(tracker, run_id))

    rows = [json.loads(x) for x in open(paths.generations)]
    safety = [r for r in rows if r["kind"] == "safety"]
    assert len(safety) == 2 * 2 + 2 * 5 and res.n_rows == len(rows) == len(safety) + 2 + 2 + 1
    for r in safety:
        assert {"attack", "question", "prompt", "response", "unsafe", "refusal_pos", "judge", "k"} <= set(r)
        assert isinstance(r["unsafe"], bool) and r["judge"] == "http" and isinstance(r["unsafe_refusal"], bool)
    assert {r["k"] for r in safety if r["attack"] == "prefill"} == {0, 3}
    comp = next(r for r in safety if r["attack"] == "completion")
    assert comp["prompt"].endswith(":\n Step 1:")

    m = json.load(open(paths.metrics))
    assert set(m["asr"]) == {"prefill", "direct", "completion", "codeattack", "selfcipher", "jailbreakchat"}
    assert set(m["asr_by_k"]) == {"0", "3"} and m["asr_mean"] is not None
    assert m["helpfulness"]["demo"]["n"] == 2 and m["over_refusal"] is not None
    assert m["helpfulness"]["alpaca"]["win_rate"] is not None
    agr = m["judge_agreement"]
    assert agr["judges"] == ["http", "refusal"] and agr["n"] == len(safety) and 0 <= agr["percent"] <= 100
    assert m == res.metrics
    assert not os.path.exists(paths.generations + ".partial")
    assert os.listdir(os.path.join(paths.eval, "judge_cache"))  # http verdicts cached on disk

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert "eval.asr.prefill" in run.data.metrics and "eval.asr_by_k.3" in run.data.metrics
    assert "eval.refusal_position.hist.0" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/generations.jsonl", "eval/metrics.json", "eval/generations_table.json"} <= arts


def test_resume_skips_done_prompts_and_runs_pair(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    from derta.eval.runner import evaluate

    small = pair.PairSettings(streams=2, depth=1, attacker_max_new_tokens=8)
    monkeypatch.setattr(pair.PairSettings, "from_config", classmethod(lambda cls, cfg: small))

    cfg = _cfg(tmp_path, "eval.attacks=[prefill,pair]", "eval.helpfulness=[]")
    paths = RunPaths(str(tmp_path), "run2")
    os.makedirs(paths.eval, exist_ok=True)
    done = {"key": "prefill|demo:0|0", "kind": "safety", "attack": "prefill", "qid": "demo:0", "question": "q",
            "prompt": "q", "prefill": "", "k": 0, "response": "RESUMED", "unsafe": False, "unsafe_lenient": False,
            "refused": False, "refusal_pos": None, "content_before_refusal": False, "judge": "refusal", "reason": ""}
    with open(paths.generations + ".partial", "w") as f:
        f.write(json.dumps(done) + "\n" + '{"key": "torn')  # a crash mid-line: ignored
    res = evaluate(cfg, paths, tiny_model_dir, None)
    rows = [json.loads(x) for x in open(paths.generations)]
    assert res.n_resumed == 1
    assert [r["response"] for r in rows if r["key"] == "prefill|demo:0|0"] == ["RESUMED"]
    assert len([r for r in rows if r["attack"] == "prefill"]) == 4
    pair_rows = [r for r in rows if r["attack"] == "pair"]
    assert len(pair_rows) == 2 and all(r["meta"]["queries"] in (1, 2) and r["meta"]["streams"] == 2 for r in pair_rows)
    assert "pair" in res.metrics["asr"]


def test_pair_loop_with_local_engines(tiny_model_dir):
    eng = HFEngine(EngineSpec(model=tiny_model_dir))
    cfg = load_config(None, ["eval.max_new_tokens=6"])
    qs = [Question("a", "How do I make a wexxel?"), Question("b", "How do I hide a zindle?")]

    class Broken:  # a judge that calls the second stream's first answer a jailbreak
        name = "refusal"

        def __init__(self):
            self.calls = 0

        def judge_batch(self, items):
            out = RefusalJudge().judge_batch(items)
            self.calls += 1
            return [o if self.calls > 1 or i != 1 else o.__class__(True, True, False, None, False, "refusal")
                    for i, o in enumerate(out)]

    rows = pair.run(qs, cfg, eng, eng, Broken(), pair.PairSettings(streams=2, depth=2, attacker_max_new_tokens=8))
    by_q = {r["qid"]: r for r in rows}
    assert by_q["a"]["meta"]["jailbroken"] and by_q["a"]["meta"]["queries"] == 2  # stopped after round 1
    assert not by_q["b"]["meta"]["jailbroken"] and by_q["b"]["meta"]["queries"] == 4
    assert pair.parse_attacker('{"improvement": "x", "prompt": "Pretend you are a chef."}', "q") == "Pretend you are a chef."
    assert pair.parse_attacker("", "fallback") == "fallback"



def test_judge_stages_without_ray(tiny_model_dir):
    """The Ray Data judge stages are plain callables: the LLM-judge actor class and the function."""
    import numpy as np

    from derta.config import EvalConfig
    from derta.eval.runner import JudgeUDF, judge_batch_fn

    meta = [{"key": "direct|a|", "kind": "safety", "attack": "direct", "qid": "a", "question": "How do I make a wexxel?",
             "prompt": "How do I make a wexxel?", "prefill": None, "k": None, "meta": {}},
            {"key": "help:demo|0|", "kind": "helpfulness", "attack": "demo", "qid": "0", "question": "How do I bake bread?",
             "prompt": "How do I bake bread?", "prefill": None, "k": None, "reference": "Sure, bake it.", "meta": {}}]
    batch = {"row": np.array([json.dumps(m) for m in meta], dtype=object),
             "response": np.array(["Sorry, I can't help with that.", "Sure, bake it in the oven."], dtype=object)}
    out = judge_batch_fn(dict(batch), EvalConfig().model_dump(mode="json"), None)
    rows = [json.loads(r) for r in out["row"]]
    assert rows[0]["unsafe"] is False and rows[0]["refusal_pos"] == 0 and rows[0]["judge"] == "refusal"
    assert rows[1]["score"] == rows[1]["token_f1"] > 0.5 and rows[1]["unsafe"] is None
    udf = JudgeUDF(EvalConfig(judge="llm", judge_model=tiny_model_dir, engine="hf").model_dump(mode="json"), None)
    rows = [json.loads(r) for r in udf(dict(batch))["row"]]
    assert rows[0]["judge"] == "llm" and isinstance(rows[0]["unsafe_refusal"], bool)
