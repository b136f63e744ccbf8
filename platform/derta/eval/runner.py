"""The evaluation stage: prompts -> generations -> judgements -> metrics, as a Ray Data pipeline.

    items (attack prompts + helpfulness requests, minus those already in the partial file, minus
           prompts longer than the engine's context: counted, derta.eval.failures)
      -> HF:   map_batches(EngineUDF, actor pool of eval.num_actors engines, batch eval.batch_size)
         vLLM: ray.data.llm's processor (derta.eval.ray_llm) over derta-rendered token ids;
               rows whose inference fails are counted (metrics.json failed_rows), not judged
      -> map_batches(JudgeUDF)            judge verdicts, refusal positions, helpfulness scores
      -> streamed to <run>/eval/generations.jsonl.partial as batches finish (resume point)
    then PAIR (iterative, driver loop over engine actors), the AlpacaEval pairwise pass (if any),
    generations.jsonl + metrics.json written atomically, and everything logged to MLflow.

generations.jsonl rows: key, kind ("safety" | "helpfulness"), attack (the benchmark name for
helpfulness rows), qid, question, prompt, prefill, k, response, unsafe (bool; null for helpfulness
rows), unsafe_lenient, refused, refusal_pos (int | null), content_before_refusal, judge, reason;
helpfulness rows add score (0..1), token_f1 / pred where relevant; with an llm/http judge, safety
rows also carry unsafe_refusal (the pattern judge's verdict, for judge agreement).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from derta import storage
from derta.config import ConfigError, ExperimentConfig
from derta.eval import helpfulness as hf
from derta.eval.attacks import AttackPrompt, get_attack, load_questions
from derta.eval.engines import EngineSpec, load_eval_tokenizer, map_generate, spec_from_config
from derta.eval.judges import JudgeInput, RefusalJudge, agreement, make_judge
from derta.eval.failures import context_limit, failure_counts, split_too_long
from derta.eval.metrics import compute_metrics
from derta.prompts import Renderer, eval_renderer

log = logging.getLogger("derta.eval")


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    generations: str  # URI of generations.jsonl
    metrics_path: str  # URI of metrics.json
    n_rows: int = 0
    n_resumed: int = 0
    seconds: float = 0.0
    engine: str = "hf"
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- items
def _item_row(it: AttackPrompt | hf.HelpItem) -> dict[str, Any]:
    """The metadata a generation row starts from (everything but the response and verdicts)."""
    if isinstance(it, AttackPrompt):
        return {
            "key": it.key, "kind": "safety", "attack": it.attack, "qid": it.qid, "question": it.question,
            "prompt": it.request.display(), "prefill": it.prefill, "k": it.k, "meta": it.meta,
            **({"reference": it.reference} if it.reference else {}),
        }
    return {
        "key": it.key, "kind": "helpfulness", "attack": it.benchmark, "qid": it.id, "question": it.question,
        "prompt": it.request.display(), "prefill": None, "k": None, "reference": it.reference, "meta": it.meta,
    }


def attack_names(cfg: ExperimentConfig) -> list[str]:
    names = list(dict.fromkeys(cfg.eval.attacks))
    for a in cfg.eval.prompt_files:
        get_attack(a)  # validates the name
        if a not in names:
            names.append(a)
    return names


def collect_items(cfg: ExperimentConfig, tokenizer: Any = None, renderer: Renderer | None = None) -> list[AttackPrompt | hf.HelpItem]:
    """Every single-pass prompt of this evaluation (PAIR is run separately: it is iterative),
    rendered for the evaluated model's `tokenizer` with the run's template (eval_renderer)."""
    e = cfg.eval
    if renderer is None:
        renderer = eval_renderer(cfg, tokenizer if tokenizer is not None else load_eval_tokenizer(cfg.model.name_or_path))
    names = attack_names(cfg)
    for a in names:
        get_attack(a)
    need_questions = any(a not in e.prompt_files for a in names)
    questions = load_questions(e.questions, e.limit) if need_questions else []
    items: list[AttackPrompt | hf.HelpItem] = []
    for a in names:
        if a in ("pair", "autodan") and a not in e.prompt_files:
            continue  # iterative: run_pair / run_autodan
        mod = get_attack(a)
        if a in e.prompt_files:
            items += mod.from_prompt_file(e.prompt_files[a], e, renderer)
        else:
            if not questions:
                raise ConfigError(f"eval.attacks includes {a!r} but eval.questions gives no questions")
            items += mod.build(questions, e, renderer)
    for b in dict.fromkeys(e.helpfulness):
        items += hf.build_items(b, e, renderer)
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ConfigError("eval: duplicate prompt keys (the same attack listed twice?)")
    return items


# --------------------------------------------------------------------------- judging (pure + UDF)
def judge_rows(rows: list[dict[str, Any]], judge: Any, pattern: RefusalJudge | None = None) -> list[dict[str, Any]]:
    """Fill verdicts (safety rows) and scores (helpfulness rows) in place; returns rows."""
    safety = [r for r in rows if r["kind"] == "safety" and not r.get("error")]
    if safety:
        inputs = [JudgeInput(r["question"], r["response"], r.get("prompt") or "", r.get("prefill") or "",
                             r.get("reference") or "") for r in safety]
        results = judge.judge_batch(inputs)
        base = pattern.judge_batch(inputs) if pattern is not None and getattr(judge, "name", "") not in ("refusal", "reference") else None
        for i, (r, res) in enumerate(zip(safety, results)):
            r.update(
                unsafe=res.unsafe, unsafe_lenient=res.unsafe_lenient, refused=res.refused, refusal_pos=res.refusal_pos,
                content_before_refusal=res.content_before_refusal, judge=res.judge, reason=res.reason,
            )
            if res.score is not None:
                r["judge_score"] = res.score
            if base is not None:
                r["unsafe_refusal"] = base[i].unsafe
    for r in rows:
        if r.get("error"):
            r.update(unsafe=None, refusal_pos=None, judge=None)
        elif r["kind"] == "helpfulness":
            r.update(unsafe=None, refusal_pos=None, judge=None)
            r.update(hf.score(r["attack"], r["response"], r.get("reference")))
    return rows


def _judge_records(batch: dict[str, Any], judge: Any, pattern: RefusalJudge) -> dict[str, Any]:
    import numpy as np

    rows = []
    errors = batch["error"] if "error" in batch else [""] * len(batch["row"])
    for meta, resp, err in zip(batch["row"], batch["response"], errors):
        r = json.loads(str(meta))
        r["response"] = str(resp)
        if err:
            r["error"] = str(err)
        rows.append(r)
    judge_rows(rows, judge, pattern)
    return {"key": np.array([r["key"] for r in rows], dtype=object),
            "row": np.array([json.dumps(r) for r in rows], dtype=object)}


def judge_batch_fn(batch: dict[str, Any], eval_cfg: dict[str, Any], cache_dir: str | None) -> dict[str, Any]:
    """Ray Data stage for cheap judges (pattern, HTTP): a plain function, so Ray Data fuses it into
    the engine actors' stage instead of starting more workers."""
    from derta.config import EvalConfig

    return _judge_records(batch, make_judge(EvalConfig.model_validate(eval_cfg), cache_dir=cache_dir), RefusalJudge())


class JudgeUDF:
    """Ray Data stage for the LLM judge: an actor holding the classifier engine."""

    def __init__(self, eval_cfg: dict[str, Any], cache_dir: str | None) -> None:
        from derta.config import EvalConfig

        self.judge = make_judge(EvalConfig.model_validate(eval_cfg), cache_dir=cache_dir)
        self.pattern = RefusalJudge()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return _judge_records(batch, self.judge, self.pattern)


# --------------------------------------------------------------------------- partial file
class PartialWriter:
    """Append-only JSONL of finished rows: the resume point. Local files are appended and flushed
    per batch; on S3 (no append) the object is rewritten at most every `every_s` seconds."""

    def __init__(self, uri: str, every_s: float = 20.0) -> None:
        self.uri, self.every_s = uri, every_s
        self.rows: list[dict[str, Any]] = []
        self._last = 0.0

    def load(self) -> dict[str, dict[str, Any]]:
        if not storage.exists_file(self.uri):
            return {}
        done: dict[str, dict[str, Any]] = {}
        for line in storage.read_text(self.uri).splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash: that prompt is simply redone
            if isinstance(r, dict) and "key" in r:
                done[r["key"]] = r
        self.rows = list(done.values())
        if storage.is_s3(self.uri):
            self._flush_s3(force=True)
        else:
            storage.write_text(self.uri, "".join(json.dumps(r) + "\n" for r in self.rows))  # drop torn lines
        return done

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        self.rows += rows
        if storage.is_s3(self.uri):
            self._flush_s3()
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.uri)), exist_ok=True)
            with open(self.uri, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
                f.flush()

    def _flush_s3(self, force: bool = False) -> None:
        if force or time.monotonic() - self._last > self.every_s:
            storage.write_text(self.uri, "".join(json.dumps(r) + "\n" for r in self.rows))
            self._last = time.monotonic()

    def close(self) -> None:
        if storage.is_s3(self.uri):
            self._flush_s3(force=True)


# --------------------------------------------------------------------------- pipeline
def generate_and_judge(
    cfg: ExperimentConfig, spec: EngineSpec, items: list[Any], writer: PartialWriter, cache_dir: str | None,
    prompt_ids: list[list[int]] | None = None, tokenizer: Any = None, failed: list[dict[str, Any]] | None = None,
) -> int:
    """Run the Ray Data pipeline over items; rows stream into the writer (rows whose inference
    failed go to `failed`, never to the resume file, so a resume retries them). HF: an actor pool of
    EngineUDFs; vLLM: ray.data.llm's processor (derta.eval.ray_llm) fed derta's token ids
    (`prompt_ids`, rendered by the caller). Returns rows written."""
    import ray

    if not items:
        return 0
    e = cfg.eval
    records = [{"key": it.key, "request": it.request.to_json(), "row": json.dumps(_item_row(it))} for it in items]
    blocks = max(1, min(len(records) // max(1, e.batch_size), 64))
    if spec.kind == "vllm":
        from derta.eval import ray_llm
        from derta.eval.engines import render_prompt_ids, split_model_ref, stop_token_ids

        tok = tokenizer if tokenizer is not None else load_eval_tokenizer(spec.model)
        ids = prompt_ids if prompt_ids is not None else [render_prompt_ids(tok, it.request) for it in items]
        lora_model, _ = ray_llm.lora_route(spec.model, split_model_ref(spec.model)[1])
        rows_in = ray_llm.to_rows(records, ids, [it.request for it in items], stop_token_ids(tok), lora_model)
        ds = ray.data.from_items(rows_in, override_num_blocks=blocks)
        ds = ray_llm.generate(ds, spec, num_actors=e.num_actors, continue_on_error=e.continue_on_error)
    else:
        ds = ray.data.from_items(records, override_num_blocks=blocks)
        ds = map_generate(ds, spec, num_actors=e.num_actors, batch_size=e.batch_size)
    judge_kwargs = {"eval_cfg": e.model_dump(mode="json"), "cache_dir": cache_dir}
    if e.judge == "llm":
        from ray.data import ActorPoolStrategy

        ds = ds.map_batches(
            JudgeUDF, fn_constructor_kwargs=judge_kwargs, batch_size=e.batch_size, compute=ActorPoolStrategy(size=1),
            num_cpus=1, num_gpus=1.0 if spec.use_gpu else None, batch_format="numpy",
        )
    else:
        ds = ds.map_batches(judge_batch_fn, fn_kwargs=judge_kwargs, batch_size=e.batch_size, num_cpus=1,
                            batch_format="numpy")
    from derta import telemetry

    total, done, t0 = len(records), 0, time.monotonic()
    last = t0
    for batch in ds.iter_batches(batch_size=e.batch_size, batch_format="numpy"):
        rows = [json.loads(str(x)) for x in batch["row"]]
        bad = [r for r in rows if r.get("error")]
        if bad and failed is not None:
            failed += bad
        rows = [r for r in rows if not r.get("error")]
        writer.add(rows)
        done += len(bad)
        done += len(rows)
        now = time.monotonic()
        for attack in sorted({str(r.get("attack")) for r in rows}):
            n = sum(str(r.get("attack")) == attack for r in rows)
            telemetry.record_generations(attack, n, seconds=(now - last) * n / max(1, len(rows)))
        telemetry.record_judged_rows(rows)
        last = now
        rate = done / max(1e-9, time.monotonic() - t0)
        log.info("eval: %d/%d prompts generated and judged (%.1f/s)", done, total, rate)
    return done


def _judge_completer(cfg: ExperimentConfig, cache_dir: str | None):
    """A prompts -> replies function from the configured llm/http judge (for pairwise judging)."""
    judge = make_judge(cfg.eval, cache_dir=cache_dir)
    if cfg.eval.judge == "http":
        return lambda prompts: [judge.complete([{"role": "user", "content": p}]) for p in prompts]
    return lambda prompts: judge.engine.generate(judge.chat_requests(prompts, 4))


def alpaca_pass(cfg: ExperimentConfig, rows: list[dict[str, Any]], cache_dir: str | None) -> dict[str, Any]:
    """Pairwise win rate for alpaca rows that have a reference answer; updates row scores."""
    todo = [r for r in rows if r["kind"] == "helpfulness" and r["attack"] == "alpaca" and r.get("score") is None]
    if not todo:
        return {}
    if cfg.eval.judge == "refusal":
        return {"alpaca": "skipped: pairwise win rate needs eval.judge=llm or http"}
    with_ref = [r for r in todo if r.get("reference")]
    if not with_ref:
        return {"alpaca": "skipped: no reference answers (add a 'reference' field to the alpaca file)"}
    complete = _judge_completer(cfg, cache_dir)
    _, wins = hf.pairwise_win_rate(
        complete, [r["question"] for r in with_ref], [r["response"] for r in with_ref],
        [r["reference"] for r in with_ref], seed=cfg.eval.seed,
    )
    for r, w in zip(with_ref, wins):
        r["score"] = w
    return {}


# --------------------------------------------------------------------------- entry
def evaluate(cfg: ExperimentConfig, paths: Any, model_dir: str | None = None, tracking: Any = None) -> EvalResult:
    """Evaluate a model (a run's model dir, a local path, builtin:tiny or s3://): safety attacks,
    judges, helpfulness; writes paths.generations and paths.metrics; logs to MLflow."""
    from derta.cluster import ensure_ray

    t0 = time.monotonic()
    model = model_dir or cfg.model.name_or_path
    ensure_ray(cfg)
    tokenizer = load_eval_tokenizer(model)
    renderer = eval_renderer(cfg, tokenizer)  # ConfigError (data.template / eval.template) before any work
    items = collect_items(cfg, tokenizer, renderer)
    spec = spec_from_config(cfg, model)
    cache_dir = None if storage.is_s3(paths.eval) else os.path.join(paths.eval, "judge_cache")

    writer = PartialWriter(paths.generations + ".partial")
    done = writer.load()
    todo = [it for it in items if it.key not in done]
    log.info("eval: %d prompts (%d already done), engine=%s, model=%s", len(items), len(items) - len(todo), spec.kind, model)
    limit = context_limit(model, cfg.eval.max_model_len)
    todo, ids, failed = split_too_long(todo, tokenizer, limit, _item_row)
    generate_and_judge(cfg, spec, todo, writer, cache_dir, prompt_ids=ids, tokenizer=tokenizer, failed=failed)
    from derta.eval.iterative import run_autodan, run_pair

    if "pair" in attack_names(cfg) and "pair" not in cfg.eval.prompt_files:
        run_pair(cfg, spec, done, writer, renderer)
    if "autodan" in attack_names(cfg) and "autodan" not in cfg.eval.prompt_files:
        run_autodan(cfg, spec, done, writer, renderer)
    writer.close()

    by_key = {**{r["key"]: r for r in failed}, **{r["key"]: r for r in writer.rows}}
    order = [it.key for it in items] + sorted(k for k in by_key if k.startswith(("pair|", "autodan|")))
    rows = [by_key[k] for k in order if k in by_key]
    ok_rows = [r for r in rows if not r.get("error")]
    notes = alpaca_pass(cfg, ok_rows, cache_dir)

    metrics = compute_metrics(ok_rows, position_unit="word")
    metrics.update(failure_counts(rows, limit))
    if cfg.eval.judge != "refusal":
        pairs = [(r["unsafe"], r["unsafe_refusal"]) for r in ok_rows if r["kind"] == "safety" and "unsafe_refusal" in r]
        metrics["judge_agreement"] = {"judges": [cfg.eval.judge, "refusal"], **agreement(*zip(*pairs))} if pairs else None
    metrics["judge"] = cfg.eval.judge
    metrics["engine"] = spec.kind
    metrics["model"] = storage_safe(model)
    if notes:
        metrics["notes"] = notes

    storage.write_text(paths.generations, "".join(json.dumps(r) + "\n" for r in rows))
    storage.write_json(paths.metrics, metrics)
    storage.delete(paths.generations + ".partial")
    if tracking is not None:
        log_to_mlflow(tracking, metrics, rows, paths)
    return EvalResult(metrics, paths.generations, paths.metrics, len(rows), len(items) - len(todo),
                      round(time.monotonic() - t0, 2), spec.kind)


def storage_safe(uri: str) -> str:
    from derta.config import redact_text

    return redact_text(str(uri))


# --------------------------------------------------------------------------- MLflow
def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric scalars of metrics.json, as MLflow metric names (eval.asr.prefill, ...)."""
    out: dict[str, float] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, bool):
            return
        if isinstance(v, (int, float)):
            out[prefix] = float(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                if k in ("cdf", "histogram", "by_attack"):
                    continue
                walk(f"{prefix}.{k}", x)

    for k in ("asr", "asr_mean", "asr_lenient", "asr_by_k", "refusal_position", "helpfulness", "over_refusal", "judge_agreement", "judge_score",
              "failed_rows", "too_long"):
        walk(f"eval.{k}", metrics.get(k))
    hist = (metrics.get("refusal_position") or {}).get("histogram") or {}
    for b, c in hist.items():
        out[f"eval.refusal_position.hist.{b.replace('+', 'plus')}"] = float(c)
    return out


def log_to_mlflow(tracking: Any, metrics: dict[str, Any], rows: list[dict[str, Any]], paths: Any) -> None:
    """Into the run named by a TrackingHandle (tracking_uri, experiment, run_id), or a Tracker's
    active run."""
    import contextlib

    from derta.tracking import Tracker

    if isinstance(tracking, Tracker):
        if not tracking.enabled or not tracking.active_run_id:
            return
        ctx = contextlib.nullcontext(tracking)
    elif hasattr(tracking, "attached"):
        if not getattr(tracking, "run_id", None):
            return
        ctx = tracking.attached()
    else:
        tracker = Tracker(tracking.tracking_uri, tracking.experiment)
        ctx = _attach(tracker, tracking.run_id)
    cols = ("kind", "attack", "k", "question", "prompt", "prefill", "response", "unsafe", "refusal_pos", "judge", "score")
    table = [{c: (r.get(c)[:2000] if isinstance(r.get(c), str) else r.get(c)) for c in cols} for r in rows]
    with ctx as tracker:
        if tracker is None or not tracker.enabled:
            return
        tracker.log_metrics(flat_metrics(metrics))
        tracker.log_table(table, "eval/generations_table.json")
        for uri in (paths.generations, paths.metrics):
            tracker.log_artifact(uri, "eval")


def _attach(tracker: Any, run_id: str | None):
    import contextlib

    @contextlib.contextmanager
    def cm():
        if not run_id:
            yield None
            return
        with tracker.attach(run_id):
            yield tracker

    return cm()


# --------------------------------------------------------------------------- derta judge
def judge_file(input_path: str, output_path: str | None = None, cfg_or_judge: Any = None, judge: str | None = None) -> dict[str, Any]:
    """`derta judge --input FILE [--output PATH]`: judge a file of responses, print the ASR line,
    return the summary. The third argument is a judge name or an ExperimentConfig (whose
    eval.judge, eval.judge_* settings are used); bad input raises ConfigError naming file:line."""
    from derta.eval.judge_file import format_summary, judge_file as _judge_file

    cfg = None if cfg_or_judge is None or isinstance(cfg_or_judge, str) else cfg_or_judge
    name = judge or (cfg_or_judge if isinstance(cfg_or_judge, str) else (cfg.eval.judge if cfg is not None else "refusal"))
    summary = _judge_file(input_path, output_path, name, cfg)
    print(format_summary(summary))
    return summary
