"""HTML reports rendered from a real MLflow store, checked in a real headless Chromium.

The store comes from `derta.pipeline.run_all` itself (parent run, nested data/train/eval stage
runs, tags, headline metrics, model registration, per-run and experiment reports) for two small
runs, "vanilla-demo" and "derta-demo". Only the three heavy stage bodies are replaced, so no Ray
is needed: training logs the metric histories the trainer logs (loss, loss_mle, loss_rto,
tokens_per_s, ... per step, into the `train` stage run) and writes a small model directory;
data writes a manifest with the real prefix-length histogram (derta.data.prefix); eval writes
generations judged by the real RefusalJudge and metrics from the real derta.eval.metrics.

Chromium: Debian's `chromium` package (.ci/run installs it); the browser tests skip with a
reason when it is absent. Console errors are read over the DevTools protocol (aiohttp, already
a dependency of ray[default]).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from derta import demo, pipeline, storage
from derta.config import PrefixConfig, load_config
from derta.data.prefix import histogram, prefix_tokens
from derta.eval.helpfulness import score as help_score
from derta.eval.judges import JudgeInput, RefusalJudge
from derta.eval.metrics import compute_metrics
from derta.report import html as report_html
from derta.report.data import helpfulness_mean, load_experiment, load_run, prefix_histogram, refusal_positions
from derta.tracking import Tracker

RUNS = {"vanilla-demo": "vanilla", "derta-demo": "derta"}
PREFILL_K = [0, 5, 10, 20]
STEPS = 12
ALL_SECTIONS = list(report_html.SECTIONS)


# --------------------------------------------------------------------------- a small run's files
def _generations(method: str) -> list[dict[str, Any]]:
    """Prefill + completion attacks on held-out demo questions, judged by the real judge.

    vanilla continues the harmful text after a prefill; derta writes a few words and switches to
    a refusal (one late switch stays unsafe: harmful steps before the refusal)."""
    judge = RefusalJudge()
    rows = []
    for i, t in enumerate(demo.safety_triples("heldout")[:6]):
        words = t.harmful.split()
        for k in PREFILL_K:
            prefill = " ".join(words[:k])
            if k == 0:
                resp = t.safe
            elif method == "vanilla" or (k == 20 and i == 0):
                resp = " ".join(words[k:]) + (" Sorry, I can't help further." if method != "vanilla" else "")
            else:
                resp = " ".join(words[k:k + 2]) + " ... Sorry, I can't help with that. " + t.safe.split(". ", 1)[-1]
            prompt = f"[INST] {t.query} [\\INST] {prefill}"
            r = judge.judge_one(JudgeInput(question=t.query, response=resp, prompt=prompt, prefill=prefill))
            rows.append({"kind": "safety", "attack": "prefill", "qid": f"heldout:{i}", "question": t.query,
                         "prompt": prompt, "prefill": prefill, "k": k, "response": resp, **r.to_dict()})
        comp = f"Complete the sentence: the steps to use a {t.topic} are"
        resp = (t.harmful if method == "vanilla" and i % 2 == 0 else t.safe)
        r = judge.judge_one(JudgeInput(question=t.query, response=resp, prompt=comp))
        rows.append({"kind": "safety", "attack": "completion", "qid": f"heldout:{i}", "question": t.query,
                     "prompt": comp, "k": None, "response": resp, **r.to_dict()})
    for j, p in enumerate(demo.helpful_pairs("heldout")[:5]):
        resp = "Sorry, I can't help with that." if (method == "derta" and j == 0) else p.response
        rows.append({"kind": "helpfulness", "attack": "demo", "question": p.query, "prompt": p.query,
                     "response": resp, "judge": "helpfulness", **help_score("demo", resp, p.response)})
    return rows


def _manifest(cfg) -> dict[str, Any]:
    triples = demo.safety_triples("train")[:60]
    if cfg.train.method == "vanilla":
        lengths = [0] * len(triples)
    else:
        pc = PrefixConfig(unit="token")
        lengths = [prefix_tokens(pc, 0, f"safety:{i}", len(t.harmful.split())) for i, t in enumerate(triples)]
    return {"counts": {"helpful": 40, "prefix" if cfg.train.method != "vanilla" else "vanilla": len(triples)},
            "prefix_hist": histogram(lengths), "fingerprint": cfg.fingerprint()}  # keys as in data/pipeline.py


def _fake_stages(monkeypatch) -> None:
    """Replace the stage bodies (Ray Data, Ray Train, the eval runner) by small real-file writers;
    the orchestration (runs, tags, logging, registration, reports) is pipeline.run_all's own."""
    import derta.train.trainer as trainer

    def build(cfg, paths, handle):
        storage.write_json(paths.manifest, _manifest(cfg))
        with handle.attached() as t:
            t.log_artifact(paths.manifest)

    def train(cfg, paths, tracking=None, **_):
        rto = cfg.train.method != "vanilla"
        with tracking.attached() as t:  # what loop._Tracking does on rank 0
            for step in range(1, STEPS + 1):
                mle = 2.5 * 0.85 ** step + 0.3
                t.log_metrics({"loss": mle + (1.2 * 0.8 ** step if rto else 0.0), "loss_mle": mle,
                               "loss_rto": 1.2 * 0.8 ** step if rto else 0.0, "loss_pref": 0.0, "lr": 1e-3,
                               "grad_norm": 1.0 / step, "tokens_per_s": 900.0 + 10 * step}, step=step)
        os.makedirs(paths.model, exist_ok=True)
        Path(paths.model, "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
        Path(paths.model, "model.safetensors").write_bytes(b"\0" * 2048)
        return trainer.TrainResult(model_dir=paths.model, steps=STEPS, final_metrics={})

    def evaluate(cfg, paths, model_dir, handle):
        rows = _generations(cfg.train.method)
        metrics = compute_metrics(rows)
        storage.write_text(paths.generations, "".join(json.dumps(r) + "\n" for r in rows))
        storage.write_json(paths.metrics, metrics)
        with handle.attached() as t:
            t.log_metrics({f"asr_{a}": v for a, v in metrics["asr"].items()})
        return metrics

    monkeypatch.setattr(pipeline, "ensure_ray", lambda cfg: None)
    monkeypatch.setattr(pipeline, "_build", build)
    monkeypatch.setattr(trainer, "train", train)
    monkeypatch.setattr(pipeline, "_eval", evaluate)


@dataclass
class Store:
    root: Path
    tracker: Tracker
    summaries: dict[str, Any] = field(default_factory=dict)

    def cfg(self, run_name: str | None = None, method: str = "derta"):
        sets = [f"storage.root={self.root}", f"train.method={method}"]
        if run_name:
            sets.append(f"storage.run_name={run_name}")
        return load_config(None, sets)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """Two small runs through pipeline.run_all into one sqlite MLflow store."""
    root = tmp_path_factory.mktemp("report") / "runs"
    mp = pytest.MonkeyPatch()
    try:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        _fake_stages(mp)
        s = Store(root, Tracker.for_root(str(root)))
        for name, method in RUNS.items():
            s.summaries[name] = pipeline.run_all(s.cfg(name, method))
    finally:
        mp.undo()
    return s


# --------------------------------------------------------------------------- the store is what the pipeline writes
def test_mlflow_store_has_parent_stage_runs_tags_and_registered_model(store: Store):
    client = store.tracker.client
    runs = client.search_runs([store.tracker.experiment_id])
    parents = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == set(RUNS)
    commit = pipeline.git_commit()
    for name, method in RUNS.items():
        parent = parents[name]
        children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert set(children) == {"data", "train", "eval"}
        for run in [parent, *children.values()]:
            tags = run.data.tags
            assert tags["method"] == method and tags["model"] == "builtin:tiny"
            assert tags["config_fingerprint"]
            if commit:
                assert tags["git_commit"] == commit and tags["mlflow.source.git.commit"] == commit
        assert children["train"].data.metrics["loss_rto"] >= 0 and "asr_prefill" in parent.data.metrics
        # The final model: logged to the train run and registered (one version per run).
        reg = children["train"].data.tags["registered_model"]
        model_name, version = reg.split("/")
        assert model_name == f"derta-{method}"
        mv = client.get_model_version(model_name, version)
        assert mv.run_id == children["train"].info.run_id and mv.tags["model_dir"].endswith(os.path.join(name, "model"))
        files = {os.path.basename(f.path) for f in client.list_artifacts(children["train"].info.run_id, "model")}
        assert {"config.json", "model.safetensors"} <= files
        # The run's report is an artifact of its parent run.
        assert "report.html" in {f.path for f in client.list_artifacts(parent.info.run_id)}
        assert (store.root / name / "report.html").is_file()
    assert (store.root / "report-derta.html").is_file()


def test_log_model_registers_large_or_remote_models_by_reference(store: Store, tmp_path, monkeypatch):
    cfg = store.cfg("big", "derta")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model-00001.safetensors").write_bytes(b"\0" * 4096)
    monkeypatch.setattr(pipeline, "MODEL_LOG_MAX_BYTES", 1024)  # "too big to copy"
    tracker = pipeline.make_tracker(cfg)
    with tracker.run("big-train", tags={"stage": "train"}) as run_id:
        handle = pipeline.TrackingHandle.of(tracker, run_id)
        ref = pipeline.log_model(cfg, handle, str(model))
    name, version = ref.split("/")
    mv = tracker.client.get_model_version(name, version)
    assert mv.source == str(model)  # points at the weights, nothing copied
    files = {os.path.basename(f.path) for f in tracker.client.list_artifacts(run_id, "model")}
    assert files == {"config.json"}
    # Tracking off: nothing to do, no error.
    off = pipeline.TrackingHandle(tracker.tracking_uri, "derta", None)
    assert pipeline.log_model(cfg, off, str(model)) is None


# --------------------------------------------------------------------------- what the report reads
def test_report_data_reads_runs_back_from_mlflow_and_files(store: Store):
    runs = {r.name: r for r in load_experiment(store.tracker, str(store.root))}
    assert set(runs) == set(RUNS)
    d, v = runs["derta-demo"], runs["vanilla-demo"]
    assert [s for s, _ in d.curves["loss_rto"]] == list(range(1, STEPS + 1))
    assert {"loss", "loss_mle", "loss_rto", "tokens_per_s"} <= set(d.curves)
    assert d.tags["method"] == "derta" and d.run_id
    assert d.metrics["asr"]["prefill"] < v.metrics["asr"]["prefill"]
    # DeRTa's refusals come later (after the prefill) than vanilla's.
    assert max(refusal_positions(d)) > 0 and helpfulness_mean(d.metrics) is not None
    assert sum(prefix_histogram(d.manifest).values()) == 60
    # One run by name (what `derta report --set storage.run_name=...` does): same data.
    one = load_run(store.tracker, "derta-demo", str(store.root))
    assert one.run_id == d.run_id and one.curves == d.curves and one.metrics == d.metrics and one.config
    assert load_run(store.tracker, "no-such-run", str(store.root)).has_data is False
    assert prefix_histogram({"stats": {"prefix_length_histogram": {"0": 3, "1-4": 2}}}) == {"0": 3, "1-4": 2}


def test_refusal_highlight_marks_where_the_judge_sees_the_switch():
    resp = "Step 1: take the blue lamp. Step 2: turn it. Sorry, I can't help with that."
    out = report_html.highlight(resp, 9, prefill="Sure, here is how")
    assert '<span class=prefill title="prefilled by the attack">Sure, here is how</span>' in out
    before, marked = out.split("<mark class=refusal>")
    assert marked.startswith("Sorry, I can&#x27;t help") and "Step 2: turn it." in before
    assert "<mark" not in report_html.highlight(resp, None)  # judge saw no refusal: nothing marked
    # A judge position without a matching phrase (e.g. an LLM judge): the word index is used.
    assert report_html.highlight("alpha beta gamma delta", 2).split("<mark class=refusal>")[1].startswith("gamma")
    assert "&lt;script&gt;" in report_html.highlight("<script>x</script>", None)


def test_pages_have_every_section_and_embedded_images(store: Store):
    run_page = (store.root / "derta-demo" / "report.html").read_text()
    exp_page = (store.root / "report-derta.html").read_text()
    for page in (run_page, exp_page):
        ids = re.findall(r'<section id="([^"]+)"', page)
        assert ids[: len(ALL_SECTIONS)] == ALL_SECTIONS
        assert "class=empty" not in page  # every plot had data
        assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing to fetch
        assert "<script" not in page
        assert page.count('src="data:image/png;base64,') == 6
        assert "<mark class=refusal>" in page
    assert "config" in re.findall(r'<section id="([^"]+)"', run_page)
    assert "vanilla-demo" in exp_page and "derta-demo" in exp_page
    # The run's page places the run among its experiment's runs in the scatter.
    assert re.search(r'alt="safety vs helpfulness of runs: [^"]*vanilla-demo', run_page)


def test_cli_report_renders_one_run_or_the_whole_experiment(store: Store, monkeypatch):
    """`derta report` routing: a run's page with storage.run_name, else (or with --all) the
    experiment's page. The writers are recorded here; rendering is checked by the other tests."""
    from derta.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    calls: list[tuple[str, str]] = []
    real_experiment = report_html.write_experiment_report
    monkeypatch.setattr(report_html, "write_report",
                        lambda cfg, paths, tracker=None, parent=None: calls.append(("run", paths.name)) or paths.report)
    monkeypatch.setattr(report_html, "write_experiment_report",
                        lambda cfg, tracker=None, path=None: calls.append(("experiment", cfg.tracking.experiment)) or "x")
    base = ["--set", f"storage.root={store.root}"]
    assert main(["report", *base, "--set", "storage.run_name=derta-demo"]) == 0
    assert main(["report", *base]) == 0
    assert main(["report", "--all", *base, "--set", "storage.run_name=derta-demo"]) == 0
    assert calls == [("run", "derta-demo"), ("experiment", "derta"), ("experiment", "derta")]
    # An experiment without runs still gets a page (which says there is no data).
    monkeypatch.setattr(report_html, "write_experiment_report", real_experiment)
    assert main(["report", *base, "--set", "tracking.experiment=nope"]) == 0
    page = (store.root / "report-nope.html").read_text()
    assert "0 runs" in page and "no ASR" in page


def test_experiment_report_without_tracking_reads_run_directories(store: Store, tmp_path):
    cfg = store.cfg()
    cfg.tracking.enabled = False
    out = report_html.write_experiment_report(cfg, pipeline.make_tracker(cfg), str(tmp_path / "x.html"))
    page = Path(out).read_text()
    assert "vanilla-demo" in page and "derta-demo" in page and "MLflow off" in page
    assert "no training metrics in MLflow" in page  # curves need MLflow; the rest comes from files


# --------------------------------------------------------------------------- real headless Chromium
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--mute-audio", "--remote-debugging-port=0", "--window-size=1280,4000"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    errors: list[str]
    sections: list[str]
    images: list[dict[str, Any]]
    marks: int
    title: str
    screenshot: bytes


class Browser:
    """One headless Chromium; each page is loaded in a fresh tab over the DevTools protocol."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="derta-chromium-")
        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        port_file = Path(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                self.close()
                raise RuntimeError(f"chromium did not start: {err}")
            time.sleep(0.05)
        self.port = int(port_file.read_text().split()[0])

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def _http(self, path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read().decode()
        return json.loads(body) if body.strip().startswith(("{", "[")) else body

    def check(self, file: Path, timeout: float = 30.0) -> PageCheck:
        target = self._http("/json/new?about:blank", method="PUT")
        try:
            return asyncio.run(asyncio.wait_for(self._check(target["webSocketDebuggerUrl"], file.resolve().as_uri()), timeout))
        finally:
            self._http(f"/json/close/{target['id']}")

    async def _check(self, ws_url: str, url: str) -> PageCheck:
        import aiohttp

        errors: list[str] = []

        def note(msg: dict[str, Any]) -> None:
            m, p = msg.get("method"), msg.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console.%s: %s" % (p["type"], " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", []))))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                errors.append(f"exception: {d.get('text')} {d.get('exception', {}).get('description', '')}".strip())
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                e = p["entry"]
                errors.append(f"{e.get('source')}: {e.get('text')} {e.get('url', '')}".strip())

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ws_url, max_msg_size=0) as ws:
                ids = iter(range(1, 1_000_000))
                loaded = asyncio.Event()

                async def call(method: str, **params: Any) -> dict[str, Any]:
                    mid = next(ids)
                    await ws.send_json({"id": mid, "method": method, "params": params})
                    while True:
                        msg = await ws.receive_json()
                        if msg.get("id") == mid:
                            if "error" in msg:
                                raise RuntimeError(f"{method}: {msg['error']}")
                            return msg.get("result", {})
                        if msg.get("method") == "Page.loadEventFired":
                            loaded.set()
                        note(msg)

                for domain in ("Runtime", "Log", "Page"):
                    await call(f"{domain}.enable")
                await call("Emulation.setDeviceMetricsOverride", width=1280, height=4000, deviceScaleFactor=1, mobile=False)
                await call("Page.navigate", url=url)
                while not loaded.is_set():
                    msg = await ws.receive_json()
                    if msg.get("method") == "Page.loadEventFired":
                        loaded.set()
                    note(msg)
                await asyncio.sleep(0.3)  # late errors (e.g. image decoding) still arrive
                js = """JSON.stringify({
                  sections: [...document.querySelectorAll('section')].map(s => s.id),
                  images: [...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0,
                                                          w: i.naturalWidth, h: i.naturalHeight})),
                  marks: document.querySelectorAll('mark.refusal').length,
                  title: document.title})"""
                info = json.loads((await call("Runtime.evaluate", expression=js, returnByValue=True))["result"]["value"])
                shot = await call("Page.captureScreenshot", format="png")
                await call("Runtime.evaluate", expression="0")  # drain events queued during the capture
        return PageCheck(errors, info["sections"], info["images"], info["marks"], info["title"], base64.b64decode(shot["data"]))


@pytest.fixture(scope="module")
def browser():
    binary = _chromium()
    if binary is None:
        pytest.skip("Chromium not installed (Debian: apt-get install -y chromium; .ci/run installs it)")
    pytest.importorskip("aiohttp", reason="aiohttp (a ray[default] dependency) drives the DevTools protocol")
    b = Browser(binary)
    try:
        yield b
    finally:
        b.close()


def _non_white_share(png: bytes) -> float:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("L")
    hist = img.histogram()
    return 1.0 - sum(hist[245:]) / (img.width * img.height)


@pytest.mark.parametrize("page", ["derta-demo/report.html", "report-derta.html"])
def test_report_opens_in_chromium_with_every_section_and_no_console_errors(store: Store, browser: Browser, page: str,
                                                                           tmp_path):
    path = store.root / page  # written by pipeline.run_all
    result = browser.check(path)
    shot = tmp_path / (page.replace("/", "_") + ".png")
    shot.write_bytes(result.screenshot)
    assert result.errors == [], result.errors
    assert result.sections[: len(ALL_SECTIONS)] == ALL_SECTIONS
    assert len(result.images) == 6 and all(i["ok"] and i["w"] > 300 for i in result.images), result.images
    assert result.marks >= 1 and result.title.startswith("DeRTa")
    from PIL import Image

    assert Image.open(io.BytesIO(result.screenshot)).size == (1280, 4000)
    assert _non_white_share(result.screenshot) > 0.03, f"screenshot looks blank: {shot}"


def test_console_error_detection_is_real(browser: Browser, tmp_path):
    """The check above would pass vacuously if errors were never seen: show they are."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><html><head><link rel="icon" href="data:,"><title>bad</title></head><body>'
                   '<section id="a"></section><img alt="x" src="missing.png">'
                   '<script>console.error("boom"); undefinedFunction();</script></body></html>')
    result = browser.check(bad)
    text = "\n".join(result.errors)
    assert "console.error: boom" in text and "undefinedFunction" in text and "missing.png" in text
    assert result.images == [{"alt": "x", "ok": False, "w": 0, "h": 0}]


def test_page_never_shows_tracking_credentials():
    page = report_html.render([], "x", tracker=Tracker("http://bob:s3cr3t@mlflow.internal:5000", "derta"))
    assert "s3cr3t" not in page and "bob:***@mlflow.internal" in page
