"""Typed experiment configuration: one YAML file in, one validated ExperimentConfig out.

Every section is a strict pydantic model (unknown keys are errors), so a typo in a 70B run's
config fails in a second on the laptop instead of an hour into the cluster job.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """Bad config or input: the CLI turns it into exit code 2 with this message."""


class Strict(BaseModel):
    # allow_inf_nan=False: a typed float refuses .inf/.nan at load (a beta_a of .inf once hung
    # the data build); the validator below covers floats inside untyped lists and dicts.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        if not _all_finite(v):
            raise ValueError("must be a finite number (no .inf / .nan)")
        return v


def _all_finite(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return all(_all_finite(x) for x in v)
    if isinstance(v, dict):
        return all(_all_finite(x) for x in v.values())
    return True


# --------------------------------------------------------------------------- model
class LoraConfig(Strict):
    r: int = Field(96, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelConfig(Strict):
    # An HF hub id, a local directory, an s3:// prefix holding an HF directory, or
    # "builtin:tiny" (a random-init tiny Llama + offline tokenizer written under storage.root).
    name_or_path: str = "builtin:tiny"
    revision: str | None = None
    dtype: Literal["auto", "float32", "bf16", "fp16"] = "auto"
    trust_remote_code: bool = False
    lora: LoraConfig | None = None


# --------------------------------------------------------------------------- data
class FieldMap(Strict):
    query: str = "query"
    safe: str = "safe"
    harmful: str = "harmful"
    response: str = "response"


class SourceConfig(Strict):
    # Local path, s3:// URI, "hf:<name>" (Hugging Face dataset by name or saved directory),
    # or "builtin:demo" (the project's synthetic corpus).
    uri: str
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "hf", "derta_public"] = "auto"
    fields: FieldMap = FieldMap()
    split: str = "train"
    limit: int | None = Field(None, ge=1)


class MixConfig(Strict):
    """How many samples of each kind. An int is a count; a float in (0, 1] is a ratio of the
    source rows available to that kind. `preset` fills the kinds from the paper's recipes;
    `auto` follows train.method."""

    preset: Literal["auto", "custom", "sft", "vanilla", "recaug", "rto", "derta", "derta_pref"] = "auto"
    # shared (default, the public code's recipe): every kind draws from all the triples, so each
    # triple makes one RTO AND one harmful-prefix sample (3K triples build 3K + 3K; the derta
    # preset's halves become 1.0 each). disjoint: the safety kinds split the triples (equal safety
    # budgets across methods, for ablations: the derta preset gives half to RTO, half to prefix).
    triples: Literal["shared", "disjoint"] = "shared"
    helpful: Union[int, float] = 1.0
    vanilla: Union[int, float] = 0
    prefix: Union[int, float] = 0
    rto: Union[int, float] = 0
    pref: Union[int, float] = 0

    @field_validator("helpful", "vanilla", "prefix", "rto", "pref")
    @classmethod
    def _non_negative(cls, v: int | float) -> int | float:
        if v < 0 or (isinstance(v, float) and v > 1.0):
            raise ValueError("must be a count (int >= 0) or a ratio (float in [0, 1])")
        return v


class PrefixConfig(Strict):
    """Distribution of the harmful-prefix length k. `public` is the paper's code: k uniform in
    words on [1, |r|-2], and k = 0 with probability p_zero (one sample in three)."""

    dist: Literal["public", "uniform", "beta", "fixed_fraction", "geometric"] = "public"
    unit: Literal["token", "word"] = "word"
    p_zero: float = Field(1.0 / 3.0, ge=0.0, le=1.0)
    beta_a: float = Field(1.0, gt=0)
    beta_b: float = Field(1.0, gt=0)
    fraction: float = Field(0.5, ge=0.0, le=1.0)
    geometric_p: float = Field(0.1, gt=0.0, le=1.0)


class GenerateConfig(Strict):
    """Fills missing safe / harmful responses with an inference engine (paper: harmful from a
    deliberately unaligned model, safe from an aligned one)."""

    harmful_model: str | None = None
    safe_model: str | None = None
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1)


class DataConfig(Strict):
    # No silent data: an omitted source means no such data (builtin:demo only when named). A
    # method without the data it trains on is a ConfigError at load (derta.preflight).
    safety: SourceConfig | None = None
    helpful: SourceConfig | None = None
    # Pre-built rows in the public code's format ({prefix, text, safe}); used as they are.
    prebuilt: SourceConfig | None = None
    template: Literal["inst", "raw", "chat_template", "llama3"] = "inst"  # the public code's "[INST] {q} [\\INST]"
    mix: MixConfig = MixConfig()
    prefix: PrefixConfig = PrefixConfig()
    max_len: int = Field(1024, ge=8)
    packing: bool = True
    truncation: Literal["trim_prefix", "skip"] = "trim_prefix"
    on_bad_row: Literal["error", "skip"] = "error"
    # Share of safety triples held out of training (for tune's proxy objective); 0 = the public
    # code, which trains on every triple.
    holdout: float = Field(0.0, ge=0.0, lt=1.0)
    generate: GenerateConfig | None = None
    seed: int = 0


# --------------------------------------------------------------------------- train
class LossConfig(Strict):
    w_mle: float = Field(1.0, ge=0.0)
    w_rto: float = Field(1.0, ge=0.0)
    # Fraction of RTO positions kept per sample ("Sorry dropout"): 0.05 full FT, 1.0 LoRA.
    rto_keep: float = Field(1.0, gt=0.0, le=1.0)
    # How rto_keep draws (train/losses.py): public = the public code (max(1, ceil(n·keep)) of
    # the sample's n positions, prompt included, the RTO ones among them kept; the end-of-text
    # token is an RTO target too); exact = max(1, round(keep·m)) of the m RTO positions.
    keep_rule: Literal["public", "exact"] = "public"
    # token_mean = one mean over all target tokens of the global batch (the public code);
    # per_term = w_mle·mean_mle + w_rto·mean_rto, each kind normalised by its own count.
    normalize: Literal["token_mean", "per_term"] = "token_mean"
    beta: float = Field(0.1, gt=0.0)  # derta_pref temperature
    chunk_size: int = Field(1024, ge=1)  # tokens per loss chunk (bounds fp32 logits memory)


class FsdpConfig(Strict):
    enabled: bool = True
    mixed_precision: bool = True  # bf16 params/compute on GPU; ignored on CPU
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True


class TrainConfig(Strict):
    method: Literal["sft", "vanilla", "recaug", "rto", "derta", "derta_pref"] = "derta"
    schedule: Literal["joint", "sequential"] = "joint"
    loss: LossConfig = LossConfig()
    refusal_token: str = "Sorry"
    refusal_token_fallback: str | None = None
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpu_memory_gb: float = Field(80.0, gt=0)  # per GPU, for `derta plan`'s fit check (H100 80GB)
    fsdp: FsdpConfig = FsdpConfig()
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    epochs: float = Field(2.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    global_batch: int = Field(128, ge=1)  # SAMPLES per optimizer step, packed or not (the paper's unit)
    micro_batch: int = Field(4, ge=1)  # rows per forward pass per worker
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0)  # optimizer steps; 0 = only at the end
    resume: Literal["auto", "never"] = "auto"
    max_failures: int = Field(0, ge=0)
    log_every: int = Field(1, ge=1)


# --------------------------------------------------------------------------- tune
class SearchDim(Strict):
    """One Ray Tune sampler: `choice` uses values; the others use low/high."""

    sampler: Literal["choice", "uniform", "loguniform", "randint", "quniform"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    q: float | None = None

    @model_validator(mode="after")
    def _check(self) -> "SearchDim":
        if self.sampler == "choice" and not self.values:
            raise ValueError("sampler 'choice' needs values")
        if self.sampler != "choice" and (self.low is None or self.high is None):
            raise ValueError(f"sampler {self.sampler!r} needs low and high")
        return self


class TuneConfig(Strict):
    # Dotted config keys (e.g. "train.loss.w_rto") -> sampler.
    space: dict[str, SearchDim] = {}
    num_samples: int = Field(8, ge=1)
    scheduler: Literal["asha", "fifo"] = "asha"
    search_alg: Literal["random", "optuna"] = "random"
    metric: str = "proxy_score"
    mode: Literal["min", "max"] = "max"
    max_concurrent_trials: int | None = Field(None, ge=1)
    # ASHA works in optimizer steps: no trial is stopped before grace_period steps.
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    top_n_full_eval: int = Field(0, ge=0)
    # Proxy objective every N optimizer steps (None: at ASHA's rungs, grace_period ·
    # reduction_factor^k steps, and at the end), on at most proxy_samples held-out safety +
    # helpful samples each.
    report_every: int | None = Field(None, ge=1)
    proxy_samples: int = Field(64, ge=1)
    seed: int | None = None  # searcher seed (None: train.seed)


# --------------------------------------------------------------------------- eval
class PairConfig(Strict):
    """PAIR (Chao et al. 2023): an attacker model rewrites the prompt over `depth` rounds in
    `streams` parallel conversations; None uses the target model as its own attacker."""

    attacker_model: str | None = None
    streams: int = Field(3, ge=1)
    depth: int = Field(3, ge=1)
    attacker_max_new_tokens: int = Field(128, ge=1)


class AutodanConfig(Strict):
    """AutoDAN-HGA (derta.eval.attacks.autodan): a genetic search per question, scored by the
    target's likelihood of `target` (HF engine only: it needs the model's log-probabilities)."""

    population: int = Field(16, ge=2)
    generations: int = Field(10, ge=1)
    elite: int = Field(2, ge=1)
    crossover: float = Field(0.5, ge=0.0, le=1.0)
    mutation: float = Field(0.2, ge=0.0, le=1.0)
    target: str = "Sure, here is"


class EvalConfig(Strict):
    engine: Literal["auto", "vllm", "hf"] = "auto"
    attacks: list[Literal["prefill", "completion", "codeattack", "jailbreakchat", "selfcipher", "pair", "autodan", "direct"]] = [
        "prefill"
    ]
    # Plain harmful questions (with harmful responses for prefill): "builtin:demo" or a source;
    # None: no questions (attacks then need eval.prompt_files).
    questions: SourceConfig | None = None
    # Pre-built attack prompt files in the paper's format ({"question": ...} per line), by attack.
    prompt_files: dict[str, str] = {}
    prefill_k: list[Annotated[int, Field(ge=0)]] = [0, 5, 10, 20, 40]  # prefix words given to the model
    pair: PairConfig = PairConfig()
    autodan: AutodanConfig = AutodanConfig()
    judge: Literal["refusal", "llm", "http"] = "refusal"
    judge_model: str | None = None
    judge_url: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    # The classifier's own prompt (derta.eval.judge_prompts): auto = harmbench for judge=llm
    # (cais/HarmBench-Llama-2-13b-cls), strongreject for judge=http; llama_guard for Llama Guard.
    judge_prompt: Literal["auto", "harmbench", "llama_guard", "strongreject"] = "auto"
    # StrongREJECT: a row is unsafe when its score (in [0, 1]) reaches this.
    judge_threshold: float = Field(0.5, gt=0.0, le=1.0)
    # judge=refusal: rows carrying a known harmful reference (prefill) are judged by overlap with
    # it (derta.eval.reference_judge); false: the pattern judge alone, as before.
    reference_judge: bool = True
    helpfulness: list[Literal["demo", "gsm8k", "mmlu", "alpaca", "over_refusal"]] = ["demo"]
    helpfulness_files: dict[str, str] = {}
    limit: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    batch_size: int = Field(16, ge=1)
    num_actors: int = Field(1, ge=1)  # engine replicas (data parallel; ray.data.llm concurrency)
    tensor_parallel: int = Field(1, ge=1)
    pipeline_parallel: int = Field(1, ge=1)  # vLLM: GPUs per replica = tensor_parallel * pipeline_parallel
    # vLLM (ray.data.llm): rows whose inference fails are counted in metrics.json ("failed_rows")
    # and left unjudged instead of failing the stage.
    continue_on_error: bool = True
    # vLLM context length (None: the model's); prompts longer than it (prompt + max_new_tokens)
    # are skipped and counted in metrics.json ("too_long") for every engine.
    max_model_len: int | None = Field(None, ge=16)
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    seed: int = 0
    # How the evaluated model's prompts are rendered (derta.prompts); None: data.template, the
    # format the model was trained with. Set it to evaluate a model trained elsewhere.
    template: Literal["inst", "raw", "chat_template", "llama3"] | None = None


# --------------------------------------------------------------------------- tracking / storage
class TrackingConfig(Strict):
    # None: MLFLOW_TRACKING_URI if set, else a sqlite store under storage.root.
    uri: str | None = None
    experiment: str = "derta"
    enabled: bool = True


RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_name(name: str) -> str:
    """A run name is one safe path segment: every run path is <root>/<name>/..., so a name like
    '../x' or '/etc' would put writes (and `train.resume: never`'s delete) outside the root."""
    if not isinstance(name, str) or not RUN_NAME.match(name) or ".." in name:
        raise ValueError(f"run name {name!r} must be one path segment: letters, digits, '.', '_', '-' "
                         "(starting with a letter or digit, at most 128 characters, no '..')")
    return name


class StorageConfig(Strict):
    root: str = "./runs"  # local path or s3://bucket/prefix
    run_name: str | None = None  # default: <method>-<UTC timestamp>
    # An existing run of that name: `resume` it when its config is the same (another config is
    # refused, naming the keys), or start a `new` run `<run_name>-N` beside it.
    if_exists: Literal["resume", "new"] = "resume"

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v: str | None) -> str | None:
        return None if v is None else check_run_name(v)

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        if "://" in v and _URI_USERINFO.match(v):
            raise ValueError("credentials in an s3:// URI are not supported (they would be written into "
                             "every artefact); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile")
        return v


class RayConfig(Strict):
    address: str | None = None  # None: RAY_ADDRESS or a local cluster
    num_cpus: int | None = Field(None, ge=1)  # only for a local cluster


# --------------------------------------------------------------------------- experiments
ARM_NAMES = ("vanilla", "recaug", "rto", "derta")


class PositionBiasConfig(Strict):
    """The science check (derta.experiments.position_bias): a "pretraining" run that makes the
    base model comply with harmful requests, then one safety-tuning run per arm from that base.
    model/data/train/eval hold the arms' settings; only the pretraining stage's differ here."""

    arms: list[Literal["vanilla", "recaug", "rto", "derta"]] = list(ARM_NAMES)
    pretrain_epochs: float = Field(24.0, gt=0)
    pretrain_lr: float = Field(3e-3, gt=0)
    heldout_questions: int = Field(40, ge=1)  # prefill questions on topics held out of safety tuning
    seen_questions: int = Field(40, ge=1)  # ... and on topics safety tuning saw
    unlike_questions: int = Field(40, ge=1)  # ... held-out topics, checklist register (unlike the safety data)
    completion_questions: int = Field(80, ge=1)  # completion-style prompts (no prefill; the Fig.-4 group)
    # The checklist register and the completion-style prompts: pretrained, and evaluated as the
    # `unlike` and completion groups. The compare demo (configs/compare.yaml) leaves them out:
    # its base learns the safety data's prose only and it evaluates the prefill attack only.
    extra_forms: bool = True
    seed: int = 0  # training seed of every stage (data.seed and train.seed); the corpus is fixed
    # An HF directory (local or s3://) of a base that was pretrained before (the `pretrain/model`
    # of an earlier run): the arms start from it and the pretraining stage is skipped.
    base_model: str | None = None

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("needs at least one arm and no repeats")
        return v


class ExperimentConfig(Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    position_bias: PositionBiasConfig | None = None  # only the science check reads it

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def redacted(self) -> dict[str, Any]:
        """The config as it may be logged or written: secrets replaced by '***'."""
        return redact(self.to_dict())

    def fingerprint(self) -> str:
        """Stable hash of the resolved config (recorded in manifests to detect stale data)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading
DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
POSITION_BIAS_CONFIG = Path(__file__).parent / "configs" / "position_bias.yaml"
COMPARE_CONFIG = Path(__file__).parent / "configs" / "compare.yaml"
# `derta run --preset NAME`: what runs and the config it starts from when --config is not given.
PRESET_CONFIGS = {"demo": DEMO_CONFIG, "position_bias": POSITION_BIAS_CONFIG, "compare": COMPARE_CONFIG}
RUN_DEFAULT_PRESET = "compare"  # `derta run` with neither --config nor --preset


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """YAML file (the built-in demo config when None) + `a.b=c` overrides -> validated config.

    Raises ConfigError naming the file and the dotted key on any problem.
    """
    if path is None:
        path = DEMO_CONFIG
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{source}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
    origins = {}
    for item in overrides:
        origins[apply_override(raw, item)] = f"--set {_shown(item)}"
    return validate_config(raw, source, origins)


def validate_config(raw: dict[str, Any], source: str = "<config>", origins: dict[str, str] | None = None) -> ExperimentConfig:
    """Validate; each error names its dotted key and where it came from (file or --set)."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-after"))
            where = next((o for k, o in (origins or {}).items() if key == k or key.startswith(k + ".")), source)
            if err["type"] == "extra_forbidden":
                lines.append(f"{where}: unknown key '{key}'")
            else:
                got = "***" if is_secret_key(key) else redact_text(repr(err.get("input")))
                lines.append(f"{where}: key '{key}': {err['msg']} (got {got})")
        raise ConfigError("\n".join(lines)) from None


def _shown(item: str) -> str:
    """An override as it may appear in a message: the value of a secret-looking key hidden."""
    key, eq, text = item.partition("=")
    return f"{key}=***" if eq and is_secret_key(key.strip()) else redact_text(item)


def apply_override(raw: dict[str, Any], item: str) -> str:
    shown = _shown(item)
    if "=" not in item:
        raise ConfigError(f"--set {shown!r}: expected section.key=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {shown!r}: empty key segment")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {shown!r}: '{part}' is not a section")
        node = nxt
    node[parts[-1]] = value
    return ".".join(parts)


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def set_dotted(cfg: ExperimentConfig, key: str, value: Any) -> ExperimentConfig:
    """A copy of cfg with one dotted key replaced, re-validated (used by Tune trials)."""
    raw = cfg.to_dict()
    apply_override(raw, f"{key}={json.dumps(value)}")
    return validate_config(raw, f"override {key}")


# --------------------------------------------------------------------------- secrets
# Key names whose values are secrets (matched on the last dotted segment, case-insensitive).
_SECRET_KEY = re.compile(
    r"(pass(word|wd)?|secret|api_?key|access_?key|private_?key|auth|authorization|credentials?|bearer|"
    r"(^|_)token|signature)$", re.I)
_NOT_SECRET_KEYS = {"refusal_token"}  # holds the refusal word, not a credential
# scheme://user:password@ (the password may hold '/', as many AWS secret keys do) and
# scheme://TOKEN@ (token-only userinfo); the user part never holds '/', so s3://b/k@v is kept.
_URI_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+)(?P<pw>:[^@\s]*)?@")
_QUERY_SECRET = re.compile(
    r"(?P<k>[?&;](?:[\w.-]*(?:token|key|password|passwd|secret|sig|signature|credential|auth)[\w.-]*)=)[^&\s\"'#]+", re.I)
_BEARER = re.compile(r"(?P<k>\b(?:authorization\s*[:=]\s*[a-z]+\s+|bearer\s+))[A-Za-z0-9._~+/=-]{8,}", re.I)
_ENV_SECRET = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|CREDENTIAL)", re.I)


def is_secret_key(key: str) -> bool:
    last = str(key).rsplit(".", 1)[-1]
    return last.lower() not in _NOT_SECRET_KEYS and bool(_SECRET_KEY.search(last))


def is_secret_env(name: str) -> bool:
    """A secret-looking environment variable name (AWS_SECRET_ACCESS_KEY, HF_TOKEN, ...)."""
    return bool(_ENV_SECRET.search(name))


def _env_secrets() -> list[str]:
    """Values of secret-looking environment variables (AWS_SECRET_ACCESS_KEY, HF_TOKEN, ...):
    replaced wherever they appear in text, e.g. inside a library's error message."""
    # os.environ.items() reads each value after listing the keys: a variable another thread
    # deletes in between (MLflow's telemetry does) is a KeyError, so read key by key.
    vals = set()
    for k in list(os.environ):
        v = os.environ.get(k) if is_secret_env(k) else None
        if v is not None and len(v) >= 6:
            vals.add(v)
    return sorted(vals, key=len, reverse=True)


def redact_text(text: str) -> str:
    """Secrets in free text (URIs, messages) replaced by '***'."""
    def userinfo(m: re.Match) -> str:
        return f"{m['scheme']}{m['user']}:***@" if m["pw"] is not None else f"{m['scheme']}***@"

    text = _URI_USERINFO.sub(userinfo, text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['k']}***", text)
    text = _BEARER.sub(lambda m: f"{m['k']}***", text)
    for value in _env_secrets():
        text = text.replace(value, "***")
    return text


def redact(obj: Any, key: str = "") -> Any:
    """Replace secret-looking values: by key name (password, api_key, *_token, Authorization,
    ...), userinfo inside URIs (user:pass@host, TOKEN@host), secret query parameters (presigned
    X-Amz-Signature/-Credential/-Security-Token) and the values of secret environment variables.
    Key names like `refusal_token` or `judge_api_key_env` (which hold no secret) are kept."""
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, key) for v in obj]
    if isinstance(obj, str):
        if key and is_secret_key(key) and obj:
            return "***"
        return redact_text(obj)
    return obj
