"""derta.tune: the search space, the proxy objective and real Ray Tune searches.

* Pure (no Ray): search-space validation and trial configs, concurrency from cluster
  resources, trial ranking, the proxy objective against a naive full-logits reference.
* Validation (slow): the proxy objective's ranking of vanilla / rto / derta agrees with the
  prefill-attack ASR ranking of the evaluation stage (its attack prompts, HF engine, judge
  and metrics) on the demo.
* Search (slow): 4 trials of a tiny model through Ray Tune + Ray Train V2 on the local
  cluster; ASHA stops a trial early; the search is interrupted after 2 trials and a second
  `run_tune` restores it and finishes; best config YAML, trials.json and MLflow runs.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch
from _fixtures import ray_local, tiny_model_dir, tiny_tokenizer  # noqa: F401
from ray.tune import Callback

from derta.config import ConfigError, load_config, validate_config


# --------------------------------------------------------------------------- space (pure)
def _cfg(**sections):
    return validate_config(sections)


def test_space_validates_keys_and_ranges_and_builds_trial_configs():
    from derta.config import SearchDim
    from derta.tune.space import apply_params, changes_data, space_dims, to_tune

    cfg = _cfg(tune={"space": {
        "data.prefix.dist": {"sampler": "choice", "values": ["public", "beta"]},
        "data.prefix.p_zero": {"sampler": "uniform", "low": 0.0, "high": 0.5},
        "train.loss.w_rto": {"sampler": "loguniform", "low": 0.25, "high": 4.0},
        "train.lr": {"sampler": "loguniform", "low": 1e-5, "high": 1e-3},
    }})
    dims = space_dims(cfg)
    assert set(to_tune(dims)) == set(dims) and changes_data(dims)
    trial = apply_params(cfg, {"data.prefix.dist": "beta", "data.prefix.p_zero": 0.2, "train.loss.w_rto": 2.0, "train.lr": 1e-4})
    assert (trial.data.prefix.dist, trial.data.prefix.p_zero, trial.train.loss.w_rto, trial.train.lr) == ("beta", 0.2, 2.0, 1e-4)
    assert cfg.train.lr == 2e-5  # the base config is untouched
    assert not changes_data({"train.lr": dims["train.lr"]})

    bad = [
        ({"train.workers": {"sampler": "choice", "values": [1, 2]}}, "cannot be searched"),
        ({"data.prefix.nope": {"sampler": "choice", "values": [1]}}, "data.prefix.nope"),
        ({"data.prefix.dist": {"sampler": "choice", "values": ["public", "zipf"]}}, "'zipf'"),
        ({"data.prefix.p_zero": {"sampler": "uniform", "low": 0.5, "high": 1.5}}, "1.5"),
        ({"train.lr": {"sampler": "loguniform", "low": 0.0, "high": 1e-3}}, "low > 0"),
        ({"train.lr": {"sampler": "uniform", "low": 1e-3, "high": 1e-4}}, "below high"),
        ({"train.max_steps": {"sampler": "quniform", "low": 10, "high": 20}}, "needs q"),
    ]
    for space, needle in bad:
        with pytest.raises(ConfigError, match="tune.space") as e:
            space_dims(_cfg(tune={"space": space}))
        assert needle in str(e.value), (space, str(e.value))
    with pytest.raises(ConfigError, match="tune.metric"):
        space_dims(_cfg(tune={"metric": "loss", "mode": "min"}))
    with pytest.raises(ConfigError, match="tune.mode: proxy_score is better when higher"):
        space_dims(_cfg(tune={"mode": "min"}))
    assert space_dims(_cfg(tune={"metric": "helpful_nll", "mode": "min"}))
    with pytest.raises(ConfigError, match="needs low and high"):
        _cfg(tune={"space": {"train.lr": {"sampler": "uniform"}}})
    assert SearchDim(sampler="randint", low=1, high=4)


def test_default_space_follows_the_method():
    from derta.tune.space import space_dims

    derta = space_dims(_cfg(train={"method": "derta"}))
    assert {"data.prefix.dist", "data.prefix.p_zero", "train.loss.w_rto", "train.loss.rto_keep", "train.lr"} <= set(derta)
    assert "train.loss.beta" not in derta
    rto = space_dims(_cfg(train={"method": "rto"}))  # no harmful-prefix samples: no prefix dims
    assert not any(k.startswith("data.prefix") for k in rto) and "train.loss.w_rto" in rto
    pref = space_dims(_cfg(train={"method": "derta_pref"}))
    assert "train.loss.beta" in pref
    vanilla = space_dims(_cfg(train={"method": "vanilla"}))
    assert set(vanilla) == {"train.lr"}


def test_max_concurrent_trials_from_cluster_resources():
    from derta.tune.tuner import max_concurrent

    cpu = _cfg(train={"workers": 1}, tune={"num_samples": 8})
    assert max_concurrent(cpu, {"CPU": 4}) == 2  # (4 - 1 for Ray Data) // (1 worker + 0.5 driver)
    assert max_concurrent(_cfg(train={"workers": 2}, tune={"num_samples": 8}), {"CPU": 4}) == 1
    assert max_concurrent(_cfg(train={"workers": 2}, tune={"num_samples": 8}), {"CPU": 1}) == 1  # at least one
    gpu = _cfg(train={"workers": 2, "use_gpu": True}, tune={"num_samples": 8})
    assert max_concurrent(gpu, {"CPU": 64, "GPU": 8}) == 4  # GPUs bound it
    assert max_concurrent(_cfg(train={"workers": 1}, tune={"num_samples": 3}), {"CPU": 64}) == 3  # never above num_samples
    assert max_concurrent(_cfg(tune={"max_concurrent_trials": 5}), {"CPU": 2}) == 5  # explicit wins


def test_proxy_runs_where_the_scheduler_decides():
    from derta.tune.proxy import ProxyHook
    from derta.tune.tuner import report_schedule

    asha = report_schedule(_cfg(tune={"grace_period": 3, "reduction_factor": 2}))
    assert asha["every"] == 0 and asha["milestones"][:4] == [3, 6, 12, 24]
    hook = ProxyHook({**asha, "safety": [], "helpful": []})
    assert [s for s in range(1, 30) if hook.due(s)] == [3, 6, 12, 24]
    assert report_schedule(_cfg(tune={"scheduler": "fifo"})) == {"every": 0, "milestones": []}  # the end only
    fixed = ProxyHook({**report_schedule(_cfg(tune={"report_every": 5})), "safety": [], "helpful": []})
    assert [s for s in range(1, 16) if fixed.due(s)] == [5, 10, 15]


def test_rank_trials_puts_completed_trials_first():
    from derta.tune.tuner import rank_trials

    rows = [
        {"trial_id": "a", "completed": True, "metrics": {"proxy_score": -5.0}},
        {"trial_id": "b", "completed": False, "metrics": {"proxy_score": -1.0}},  # stopped early
        {"trial_id": "c", "completed": True, "metrics": {"proxy_score": -3.0}},
        {"trial_id": "d", "completed": True, "metrics": {}},
    ]
    assert [r["trial_id"] for r in rank_trials(rows, "proxy_score", "max")] == ["c", "a", "d", "b"]
    assert [r["trial_id"] for r in rank_trials(rows, "proxy_score", "min")][:2] == ["a", "c"]


def test_cli_rejects_a_bad_space_before_starting_anything(tmp_path, capsys):
    from derta.cli import main

    cfg = tmp_path / "tune.yaml"
    cfg.write_text("tune:\n  space:\n    train.workers: {sampler: choice, values: [1, 2]}\n"
                   f"storage: {{root: {tmp_path / 'runs'}}}\n")
    assert main(["tune", "--config", str(cfg)]) == 2
    assert "tune.space.train.workers" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- proxy (pure torch)
def _proxy_set(cfg, tokenizer, n: int = 8):
    from derta.data.templates import make_template
    from derta.demo import helpful_pairs, safety_triples
    from derta.tune.proxy import build_proxy_set

    template = make_template(cfg.data.template, tokenizer)
    return build_proxy_set(template, cfg.data, [vars(t) for t in safety_triples("heldout")],
                           [vars(h) for h in helpful_pairs("heldout")], tokenizer.pad_token_id, limit=n)


def test_proxy_objective_matches_a_naive_reference(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from derta.models import refusal_token_id
    from derta.train.losses import DertaObjective
    from derta.tune.proxy import _shard, evaluate, helpful_nll, make_batches, proxy_score, transition_score

    cfg = _cfg(model={"name_or_path": tiny_model_dir}, data={"max_len": 160})
    ps = _proxy_set(cfg, tiny_tokenizer, n=6)
    assert len(ps.safety) == 6 and len(ps.helpful) == 6
    assert all(sum(s["rto_mask"]) > 10 and all(x == -100 for x in s["labels"]) for s in ps.safety)
    sorry = refusal_token_id(tiny_tokenizer)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a model that is not uniform over the vocabulary
        lm.get_output_embeddings().weight.add_(torch.randn_like(lm.get_output_embeddings().weight))

    vals, mins, nll = [], [], []
    with torch.no_grad():
        for s in ps.safety:
            lp = torch.log_softmax(lm(input_ids=torch.tensor([s["input_ids"]])).logits[0].double(), -1)
            v = [float(lp[t - 1, sorry]) for t, m in enumerate(s["rto_mask"]) if m]
            vals += v
            mins.append(min(v))
        for s in ps.helpful:
            lp = torch.log_softmax(lm(input_ids=torch.tensor([s["input_ids"]])).logits[0].double(), -1)
            nll += [-float(lp[t - 1, y]) for t, y in enumerate(s["labels"]) if y != -100]
    ref = (sum(vals) / len(vals), sum(mins) / len(mins), sum(nll) / len(nll))

    sb, hb = make_batches(ps.safety, 4, ps.pad_id), make_batches(ps.helpful, 4, ps.pad_id)  # padded, uneven
    mean, worst = transition_score(lm, sb, sorry)
    assert mean == pytest.approx(ref[0], abs=1e-4) and worst == pytest.approx(ref[1], abs=1e-4)
    assert helpful_nll(lm, hb) == pytest.approx(ref[2], abs=1e-4)
    assert worst < mean < 0
    m = evaluate(DertaObjective(lm), sb, hb, sorry)  # the training loop's module gives the same numbers
    assert m["proxy_score"] == pytest.approx(proxy_score(*ref), abs=1e-3)
    assert m["proxy_score"] == pytest.approx(ref[0] + ref[1] - ref[2], abs=1e-3)

    # Across ranks: every batch exactly once, every rank the same number of forward passes.
    for n, world in [(5, 2), (2, 4), (0, 3), (7, 3)]:
        shards = [_shard(n, r, world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        assert sorted(i for s in shards for i, w in s if w) == list(range(n))


# --------------------------------------------------------------------------- validation (slow)
def _train(lm, samples, steps: int, lr: float, transition: str, refusal_id: int, pad_id: int, batch: int = 16):
    """The training loop's objective (derta_loss) on one process: enough for a 0.2M model."""
    from derta.train.losses import derta_loss
    from derta.tune.proxy import make_batches

    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=lr)
    for step in range(steps):
        chunk = [samples[(step * batch + j) % len(samples)] for j in range(batch)]
        out = derta_loss(lm, make_batches(chunk, batch, pad_id)[0], refusal_id=refusal_id, transition=transition)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return lm.eval()


@pytest.mark.slow
def test_proxy_ranks_vanilla_rto_derta_like_the_prefill_attack(tiny_model_dir, tmp_path):
    """The paper's setting in miniature: a base model that knows how to continue harmful
    responses (the tiny model tuned on q -> harmful and helpful pairs, like a pretrained LLM),
    then three safety tunings from it on the same safety triples: vanilla (q -> refusal),
    rto (refusal at every harmful position), derta (half rto, half harmful-prefix samples).
    The evaluation stage's prefill attack (its prompts, HF engine, refusal judge and metrics)
    gives their ASR on the held-out demo questions; the proxy objective, from forward passes
    only on the same held-out triples, must order the methods the same way."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from derta.data.templates import make_template
    from derta.data.tokenize import SampleBuilder
    from derta.demo import helpful_pairs, safety_triples
    from derta.eval.attacks import load_questions
    from derta.eval.attacks import prefill as prefill_attack
    from derta.eval.engines import EngineSpec, HFEngine
    from derta.eval.judges import RefusalJudge
    from derta.eval.metrics import compute_metrics
    from derta.prompts import eval_renderer
    from derta.eval.runner import _item_row, judge_rows
    from derta.models import refusal_token_id
    from derta.tune.proxy import evaluate, make_batches

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is ~10x faster than two on a busy 2-core machine
    t0 = time.perf_counter()
    try:
        cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "data.max_len=160", "eval.limit=12",
                                 "eval.max_new_tokens=40", "eval.prefill_k=[0, 20, 40]"])
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        sorry, pad = refusal_token_id(tok), tok.pad_token_id
        template = make_template(cfg.data.template, tok)
        builder = SampleBuilder(template, cfg.data)
        triples, helps = safety_triples("train"), helpful_pairs("train")

        def samples(method: str) -> list[dict]:
            recs = []
            for i, t in enumerate(triples):  # the mix presets: every triple one safety sample
                kind = {"base": "helpful", "vanilla": "vanilla", "rto": "rto"}.get(method) or ("rto" if i % 2 else "prefix")
                recs.append({"source_id": f"safety:{i}", "query": t.query, "safe": t.safe, "harmful": t.harmful,
                             "response": t.harmful, "kinds": [kind]})
            recs += [{"source_id": f"helpful:{i}", "query": h.query, "response": h.response, "kinds": ["helpful"]}
                     for i, h in enumerate(helps)]
            built, _ = builder.build(recs)
            rows = [s.row() for s in built]
            random.Random(0).shuffle(rows)
            return rows

        torch.manual_seed(0)
        base = _train(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), samples("base"),
                      150, 3e-3, "none", sorry, pad)
        ps = _proxy_set(cfg, tok, n=24)
        sb, hb = make_batches(ps.safety, 12, ps.pad_id), make_batches(ps.helpful, 12, ps.pad_id)
        items = prefill_attack.build(load_questions(cfg.eval.questions, cfg.eval.limit), cfg.eval,
                                     renderer=eval_renderer(cfg, tok))
        proxy, asr = {}, {}
        for method in ("vanilla", "rto", "derta"):
            torch.manual_seed(0)
            lm = _train(copy.deepcopy(base), samples(method), 20, 1e-3, "none" if method == "vanilla" else "rto", sorry, pad)
            proxy[method] = evaluate(lm, sb, hb, sorry)
            out = str(tmp_path / method)
            lm.save_pretrained(out)
            tok.save_pretrained(out)
            engine = HFEngine(EngineSpec(model=out, kind="hf", batch_size=48))
            rows = [_item_row(it) for it in items]
            for r, text in zip(rows, engine.generate([it.request for it in items])):
                r["response"] = text
            asr[method] = compute_metrics(judge_rows(rows, RefusalJudge()))["asr"]["prefill"]
    finally:
        torch.set_num_threads(threads)
    score = {m: p["proxy_score"] for m, p in proxy.items()}
    print(f"\nproxy vs prefill ASR ({time.perf_counter() - t0:.0f}s):")
    for m in proxy:
        print(f"  {m:8s} ASR {asr[m]:5.1f}%  proxy_score {score[m]:8.3f}  transition mean {proxy[m]['transition_mean']:.3f} "
              f"min {proxy[m]['transition_min']:.3f}  helpful_nll {proxy[m]['helpful_nll']:.3f}")
    # The comparison is not vacuous: the prefill attack separates vanilla from the RTO methods ...
    assert asr["vanilla"] > asr["rto"] and asr["vanilla"] > asr["derta"], asr
    # ... and the proxy never orders two methods against the attack (ties in ASR allow any order).
    for a in proxy:
        for b in proxy:
            if asr[a] > asr[b]:
                assert score[a] < score[b], (a, b, asr, score)


def test_heldout_helpful_rows_follow_the_holdout_rule(ray_local, tmp_path):
    """A file source: the rows whose id hash falls under data.holdout, in hash order, capped."""
    import json

    from derta.data.pipeline import HOLDOUT_SALT
    from derta.data.prefix import row_uniform
    from derta.tune.tuner import heldout_helpful_rows

    src = tmp_path / "helpful.jsonl"
    src.write_text("".join(json.dumps({"query": f"q{i}", "response": f"r{i}"}) + "\n" for i in range(200)))
    cfg = _cfg(data={"helpful": {"uri": str(src)}, "holdout": 0.2})
    rows = heldout_helpful_rows(cfg, limit=1000)
    u = {r["source_id"]: row_uniform("", r["source_id"], HOLDOUT_SALT) for r in rows}
    assert 20 <= len(rows) <= 60 and all(v < 0.2 for v in u.values())
    assert [r["source_id"] for r in rows] == sorted(u, key=u.get)
    assert all(r["query"] == "q" + r["source_id"].split(":")[-1] for r in rows)
    assert heldout_helpful_rows(cfg, limit=5) == rows[:5]
    demo = heldout_helpful_rows(_cfg(data={"helpful": {"uri": "builtin:demo"}}), limit=3)  # its held-out tasks
    assert len(demo) == 3 and demo[0]["source_id"] == "demo-heldout:0"


# --------------------------------------------------------------------------- a real search (slow)
class InterruptAfter(Callback):
    """Stops the search like Ctrl+C does (Tune saves its state first) once `n` trials have
    ended; one-shot (a marker file), since a restored search brings its callbacks back."""

    def __init__(self, n: int, marker: str):
        self.n, self.marker, self.ended = n, marker, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended += 1
        if self.ended >= self.n and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's handler: end the run, state saved


def _reserved_groups(ray) -> list[str]:
    return [pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] not in ("REMOVED",)]


def _janitors(ray) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("derta-tune-janitor")]


def _tune_cfg(root: str, model: str):
    return validate_config({
        "model": {"name_or_path": model},
        "data": {"safety": {"uri": "builtin:demo", "limit": 96}, "helpful": {"uri": "builtin:demo", "limit": 48},
                 "max_len": 160, "holdout": 0.1},
        "train": {"method": "derta", "workers": 1, "max_steps": 2, "global_batch": 8, "micro_batch": 8,
                  "warmup_ratio": 0.0, "log_every": 1},
        # Seed 1 samples lr 3e-3, 1e-7, 1e-7, 1e-7: the second trial (one trial at a time) is
        # clearly worse than the first at ASHA's first rung (step 1) and is stopped there.
        "tune": {"num_samples": 4, "max_concurrent_trials": 1, "scheduler": "asha", "search_alg": "random",
                 "grace_period": 1, "reduction_factor": 2, "proxy_samples": 12, "seed": 1,
                 "space": {"train.lr": {"sampler": "choice", "values": [3e-3, 1e-7]},
                           "train.loss.w_rto": {"sampler": "uniform", "low": 0.5, "high": 2.0}}},
        "storage": {"root": root, "run_name": "search"},
    })  # fmt: skip


@pytest.mark.slow
def test_tune_asha_best_config_mlflow_and_restore(ray_local, tiny_model_dir, tmp_path, capsys):
    from derta import storage
    from derta.tracking import Tracker
    from derta.tune.tuner import DONE_FILE, run_tune, trial_paths

    root = str(tmp_path / "runs")
    marker = str(tmp_path / "interrupted")
    groups_before = set(_reserved_groups(ray_local))  # other tests' groups are not ours to judge
    t0 = time.perf_counter()
    first = run_tune(_tune_cfg(root, tiny_model_dir), callbacks=[InterruptAfter(2, marker)])
    t1 = time.perf_counter()
    assert first.interrupted and not first.restored and os.path.exists(marker)
    ended = [r for r in first.trials if r["status"] in ("completed", "early_stopped")]
    assert len(ended) == 2, first.trials
    stopped = [r for r in ended if r["status"] == "early_stopped"]
    assert len(stopped) == 1 and stopped[0]["params"]["train.lr"] == 1e-7 and stopped[0]["steps"] == 1
    done = {r["trial_id"]: os.path.getmtime(os.path.join(trial_paths(first.paths.dir, r["trial_id"]).dir, DONE_FILE))
            for r in ended if r["completed"]}
    assert len(done) == 1

    second = run_tune(_tune_cfg(root, tiny_model_dir))  # same run name: the saved search is restored
    t2 = time.perf_counter()
    with capsys.disabled():
        print(f"\nsearch: first session {t1 - t0:.0f}s (interrupted after 2 trials), restored session {t2 - t1:.0f}s")
    assert second.restored and not second.interrupted
    assert len(second.trials) == 4 and {r["trial_id"] for r in ended} <= {r["trial_id"] for r in second.trials}
    assert all(r["status"] in ("completed", "early_stopped") for r in second.trials), second.trials
    by_id = {r["trial_id"]: r for r in second.trials}
    assert by_id[stopped[0]["trial_id"]]["status"] == "early_stopped"
    for tid, mtime in done.items():  # finished before the interruption: not run again
        assert os.path.getmtime(os.path.join(trial_paths(second.paths.dir, tid).dir, DONE_FILE)) == mtime
    assert all(r["metrics"]["proxy_score"] < 0 for r in second.trials)
    for r in second.trials:  # a stopped trial never resumes: its resume state is gone
        assert not os.path.exists(trial_paths(second.paths.dir, r["trial_id"]).checkpoints)
    # Stopped trials' worker groups were released (the janitor: no dashboard on this cluster).
    def leftovers():
        return set(_reserved_groups(ray_local)) - groups_before, _janitors(ray_local)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(leftovers()):
        time.sleep(1)
    assert not any(leftovers()), leftovers()  # no worker group held, and the janitors are gone too

    # The best trial (the only one that learned: lr 3e-3) and its config, as YAML, printed.
    assert second.best["params"]["train.lr"] == 3e-3 and second.best["completed"]
    best = load_config(second.best_config_path)
    assert best.train.lr == 3e-3 and best.train.loss.w_rto == pytest.approx(second.best["params"]["train.loss.w_rto"])
    assert best.storage.run_name is None and second.best_config_path.endswith("tune/best_config.yaml")
    assert "best config" in capsys.readouterr().out
    summary = storage.read_json(storage.join(second.paths.dir, "tune", "trials.json"))
    assert not summary["interrupted"] and len(summary["trials"]) == 4

    # MLflow: one parent run (verb=tune) with one nested run per trial.
    tracker = Tracker.for_root(root)
    client = tracker.client
    parent = client.get_run(second.parent_run_id)
    assert parent.data.tags["verb"] == "tune" and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_proxy_score"] == pytest.approx(second.best["metrics"]["proxy_score"])
    assert parent.data.params["best.train.lr"] == "0.003"
    kids = client.search_runs([tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{second.parent_run_id}'")
    assert sorted(k.data.tags["tune.trial_id"] for k in kids) == sorted(by_id)
    for k in kids:
        r = by_id[k.data.tags["tune.trial_id"]]
        assert k.data.tags["tune.outcome"] == r["status"] and k.info.status == "FINISHED"
        assert float(k.data.params["tune.train.lr"]) == r["params"]["train.lr"]
        # rank 0 logged the proxy at every step it reached (a stopped trial may run on a step
        # while Tune acts on ASHA's decision)
        assert r["steps"] <= len(client.get_metric_history(k.info.run_id, "proxy_score")) <= 2
