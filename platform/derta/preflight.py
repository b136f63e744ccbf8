"""Preflight: everything that would fail hours into a GPU run, checked at config load.

`check(cfg, stages)` runs in `derta plan`, every CLI verb and every job (jobs/_job.py) before
Ray starts. It reads the model's config.json and tokenizer (small files; no weights) and
raises one ConfigError (exit 2) listing each problem with the config key to change; what can
run but deserves a look comes back as notes. Stages: data, train, tune, eval, generate, judge
(train and tune build data first).

Checked: storage.root writable; the method's data named (no builtin:demo fallback) and local
files present; attacks implemented (each attack's own build([]) raises if not), judge settings,
benchmark files; vLLM / LLM judges only where GPUs are declared (and not built in a GPU-less
driver); the model config readable, data.max_len within its context, a LoRA rank vLLM can serve
(rounded up: vllm_max_lora_rank, also used by eval/engines.py); the tokenizer supports
data.template and eval's chat rendering, and train.refusal_token is one token.

Offline / CI: a model whose config.json cannot be read is a ConfigError naming
model.name_or_path (exit 2, unlike `--plan`'s exit 1 for "does not fit"). A tokenizer that
cannot be read is a ConfigError too, except when planning (`derta plan`, `--plan`), where the
tokenizer checks are skipped with a note: plans size models from config.json alone.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from derta.config import ConfigError, ExperimentConfig

# vLLM's --max-lora-rank accepts only these (vllm/config LoRAConfig.possible_max_ranks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
TRAIN_STAGES = ("data", "train", "tune")
MODEL_STAGES = ("data", "train", "tune", "eval", "generate")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt")


# --------------------------------------------------------------------------- pure rules
def vllm_max_lora_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that serves an adapter of rank r."""
    for allowed in VLLM_LORA_RANKS:
        if r <= allowed:
            return allowed
    raise ConfigError(f"model.lora.r={r}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}")


def uses_vllm(cfg: ExperimentConfig) -> bool:
    """eval.engine=vllm, or auto on a config that declares GPUs (auto picks vLLM there)."""
    return cfg.eval.engine == "vllm" or (cfg.eval.engine == "auto" and cfg.train.use_gpu)


def check_data(cfg: ExperimentConfig) -> list[str]:
    """The method's data must be named: omitted sources mean no data (no builtin:demo fallback)."""
    from derta.data.mix import SAFETY_ORDER, resolve_mix

    d = cfg.data
    if d.prebuilt is not None:
        if _missing_local(d.prebuilt.uri):
            raise ConfigError(f"data.prebuilt.uri: {d.prebuilt.uri}: no such file or directory")
        return []
    preset, amounts = resolve_mix(d.mix, cfg.train.method)
    safety_kinds = [k for k in SAFETY_ORDER if amounts.get(k)]
    if safety_kinds and d.safety is None:
        raise ConfigError(
            f"data.safety: train.method={cfg.train.method} (data.mix preset {preset}) builds {', '.join(safety_kinds)} "
            "samples from safety triples, but data.safety is not set (an omitted source means no data; "
            "name builtin:demo for the demo corpus)")
    if not safety_kinds and d.helpful is None:
        raise ConfigError(
            f"data.safety / data.helpful: train.method={cfg.train.method} (data.mix preset {preset}) builds no safety "
            "samples and data.helpful is not set: the config has no training data")
    for role, src in (("safety", d.safety), ("helpful", d.helpful)):
        if src is not None and src.format != "hf" and _missing_local(src.uri):
            raise ConfigError(f"data.{role}.uri: {src.uri}: no such file or directory")
    notes = []
    if d.helpful is None and amounts.get("helpful"):
        notes.append("data.helpful is not set: no helpful samples (safety samples only)")
    return notes


def storage_problem(root: str) -> str | None:
    """Why storage.root cannot be written (None: it can). Local: probe the nearest existing
    directory with a temporary file; s3: the URI names a bucket (reachability is another check)."""
    if root.startswith("s3://"):
        return None if root[len("s3://"):].split("/", 1)[0] else f"storage.root={root!r}: no bucket name"
    if "://" in root:
        return f"storage.root={root!r}: only local paths and s3:// are supported"
    p = Path(root).expanduser().absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"storage.root={root!r}: {probe} is a file, not a directory"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".derta-preflight-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return f"storage.root={root!r}: cannot write under {probe} ({e.strerror or e})"
    return None


# --------------------------------------------------------------------------- model files
def read_model_config(ref: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's HF config (config.json only); ConfigError naming model.name_or_path."""
    from derta.plan import _hf_config

    try:
        return _hf_config(ref, revision, trust_remote_code)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, HTTP, JSON: all "cannot read"
        raise ConfigError(f"model.name_or_path={ref!r}: cannot read the model config (config.json): "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def read_tokenizer(ref: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's tokenizer from its small files (an s3:// directory: those files only)."""
    from transformers import AutoTokenizer

    from derta.models import resolve_model_path

    if ref.startswith("s3://"):
        from derta import storage

        with tempfile.TemporaryDirectory() as tmp:
            for name in TOKENIZER_FILES + ("config.json",):
                uri = storage.join(ref, name)
                if storage.exists(uri):
                    Path(tmp, name).write_bytes(storage.read_bytes(uri))
            return AutoTokenizer.from_pretrained(tmp, trust_remote_code=trust_remote_code)
    return AutoTokenizer.from_pretrained(resolve_model_path(ref), revision=revision, trust_remote_code=trust_remote_code)


def _context_length(hf: Any) -> int | None:
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    return getattr(text, "max_position_embeddings", None)


# --------------------------------------------------------------------------- the check
def check(cfg: ExperimentConfig, stages: Iterable[str] = ("train", "eval"), *, planning: bool = False) -> list[str]:
    """Notes for what can run; one ConfigError listing every problem that would fail later."""
    stages = set(stages)
    if stages & {"train", "tune"}:
        stages.add("data")
    problems: list[str] = []
    notes: list[str] = []

    def attempt(fn, *args):
        try:
            return fn(*args)
        except ConfigError as e:
            problems.append(str(e))
            return None

    p = storage_problem(cfg.storage.root)
    if p:
        problems.append(p)
    if "data" in stages:
        notes += attempt(check_data, cfg) or []
    if ("generate" in stages or ("data" in stages and cfg.data.generate)) and cfg.data.safety is None:
        problems.append("data.safety: response generation fills the safety source's rows, but data.safety is not set")
    if "tune" in stages:
        from derta.tune.space import space_dims

        attempt(space_dims, cfg)  # a search over a key it cannot change
    if "tune" in stages and not cfg.data.holdout:
        problems.append("data.holdout: the tune proxy objective scores trials on held-out safety triples, "
                        "but data.holdout is 0 (set e.g. data.holdout=0.1)")
    if "eval" in stages:
        _check_eval(cfg, problems)
    if "judge" in stages:
        _check_judge(cfg, problems)
    if stages & {"eval", "generate"}:
        _check_gpu(cfg, problems, notes)
    if "eval" in stages:
        _check_driver_judge(cfg, planning, problems, notes)
    if stages & set(MODEL_STAGES):
        _check_model(cfg, stages, planning, problems, notes)
    if problems:
        raise ConfigError("preflight: the run would fail later:\n  " + "\n  ".join(problems))
    return notes


def _check_eval(cfg: ExperimentConfig, problems: list[str]) -> None:
    from derta.eval.attacks import get_attack

    e = cfg.eval
    for name in dict.fromkeys(e.attacks):
        module = get_attack(name)
        if not getattr(module, "IMPLEMENTED", True):
            problems.append(module.MESSAGE)
    if "autodan" in e.attacks and "autodan" not in e.prompt_files and (e.engine == "vllm" or uses_vllm(cfg)):
        problems.append("eval.attacks=autodan: the AutoDAN search needs the target's likelihoods from the HF engine; "
                        "set eval.engine=hf (or replay pre-found prompts with eval.prompt_files.autodan)")
    for b in dict.fromkeys(e.helpfulness):
        if b in FILE_BENCHMARKS and not e.helpfulness_files.get(b):
            problems.append(f"eval.helpfulness includes {b!r}: set eval.helpfulness_files.{b} to its JSONL file")
    files = [(f"eval.prompt_files.{k}", v) for k, v in e.prompt_files.items()]
    files += [(f"eval.helpfulness_files.{k}", v) for k, v in e.helpfulness_files.items()]
    if e.questions is not None:
        files.append(("eval.questions.uri", e.questions.uri))
    problems.extend(f"{key}={uri!r}: no such file" for key, uri in files if _missing_local(uri))
    need = [a for a in e.attacks if a not in e.prompt_files]
    if need and e.questions is None:
        problems.append(f"eval.questions: eval.attacks {need} build prompts from harmful questions, but "
                        "eval.questions is not set (name builtin:demo or a file, or give eval.prompt_files)")
    _check_judge(cfg, problems)


FILE_BENCHMARKS = ("gsm8k", "mmlu", "alpaca")  # helpfulness benchmarks read from eval.helpfulness_files


def _missing_local(uri: str) -> bool:
    """A local path that does not exist (s3://, hf: and builtin: are checked where they are read)."""
    return "://" not in uri and not uri.startswith(("builtin:", "hf:")) and not Path(uri).expanduser().exists()


def _check_judge(cfg: ExperimentConfig, problems: list[str]) -> None:
    e = cfg.eval
    if e.judge == "llm" and not e.judge_model:
        problems.append("eval.judge_model: eval.judge=llm needs a classifier model (HF id or path)")
    if e.judge == "http" and not (e.judge_url and e.judge_model):
        problems.append("eval.judge_url / eval.judge_model: eval.judge=http needs both (an OpenAI-compatible endpoint)")


def _check_gpu(cfg: ExperimentConfig, problems: list[str], notes: list[str]) -> None:
    e = cfg.eval
    if cfg.train.use_gpu:
        return
    if e.engine == "vllm":
        problems.append("eval.engine=vllm needs GPUs, but the config declares none (train.use_gpu: false); "
                        "set train.use_gpu: true or eval.engine: hf")
    if e.judge == "llm" and e.engine != "hf":
        problems.append(f"eval.judge=llm serves {e.judge_model} on a GPU engine (eval.engine={e.engine}), but the config "
                        "declares no GPU (train.use_gpu: false): set train.use_gpu: true, or eval.engine: hf for a CPU judge")


def driver_gpu() -> bool:
    """Whether this process (the job's driver, where preflight runs) sees a GPU."""
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch CUDA build: no GPU
        return False


def _check_driver_judge(cfg: ExperimentConfig, planning: bool, problems: list[str], notes: list[str]) -> None:
    """PAIR and alpaca's pairwise win rate build the LLM judge in the driver (eval/runner.py),
    and eval.engine auto/vllm on a GPU cluster puts it on a GPU: a CPU-only head cannot."""
    e = cfg.eval
    users = (["pair"] if "pair" in e.attacks and "pair" not in e.prompt_files else []) + (
        ["alpaca"] if "alpaca" in e.helpfulness else [])
    if not (users and e.judge == "llm" and e.engine != "hf" and cfg.train.use_gpu) or driver_gpu():
        return
    what = (f"eval.judge=llm: {' and '.join(users)} build the LLM judge in the driver, on a GPU engine "
            f"(eval.engine={e.engine}), but this driver has no GPU (a CPU-only head); use eval.judge=http, "
            "or run the driver on a GPU node")
    (notes if planning else problems).append(what)


def _check_model(cfg: ExperimentConfig, stages: set[str], planning: bool, problems: list[str], notes: list[str]) -> None:
    from derta.data.templates import make_template
    from derta.models import refusal_token_id

    m = cfg.model
    try:
        hf = read_model_config(m.name_or_path, m.revision, m.trust_remote_code)
    except ConfigError as err:
        problems.append(str(err))
        return
    ctx = _context_length(hf)
    if ctx is not None and cfg.data.max_len > ctx:
        problems.append(f"data.max_len={cfg.data.max_len} exceeds the model's context "
                        f"(max_position_embeddings={ctx} in {m.name_or_path}'s config.json)")
    elif ctx is not None and "eval" in stages and cfg.data.max_len + cfg.eval.max_new_tokens > ctx:
        notes.append(f"data.max_len + eval.max_new_tokens = {cfg.data.max_len + cfg.eval.max_new_tokens} > the model's "
                     f"context {ctx}: long prompts leave fewer new tokens")
    if m.lora is not None and stages & {"eval", "generate"} and uses_vllm(cfg):
        try:
            rank = vllm_max_lora_rank(m.lora.r)
            if rank != m.lora.r:
                notes.append(f"model.lora.r={m.lora.r}: vLLM serves the adapter with max_lora_rank={rank} "
                             f"(it accepts only {', '.join(map(str, VLLM_LORA_RANKS))})")
        except ConfigError as err:
            problems.append(str(err))
    try:
        tok = read_tokenizer(m.name_or_path, m.revision, m.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - any failure to read the tokenizer files
        what = f"model.name_or_path={m.name_or_path!r}: cannot read the tokenizer ({type(err).__name__})"
        if planning:
            notes.append(what + ": template and refusal-token checks skipped")
        else:
            problems.append(what)
        return
    if "data" in stages:
        try:
            make_template(cfg.data.template, tok)
        except ConfigError as err:
            problems.append(str(err))
    if stages & {"train", "tune"}:
        try:
            refusal_token_id(tok, cfg.train.refusal_token, cfg.train.refusal_token_fallback)
        except ConfigError as err:
            problems.append(str(err))
    if "eval" in stages:
        from derta.prompts import check_template, eval_template

        try:
            check_template(tok, *eval_template(cfg))  # eval renders with eval.template, else data.template
        except ConfigError as err:
            problems.append(str(err))
