"""The search space: tune.space (dotted config keys -> Ray Tune samplers) and how a sampled
point becomes a trial's ExperimentConfig.

YAML (each value a SearchDim; samplers are Ray Tune's, with Tune's semantics: randint's high
is exclusive, quniform rounds to multiples of q):

    tune:
      space:
        data.prefix.dist:   {sampler: choice, values: [public, uniform, beta, geometric]}
        data.prefix.p_zero: {sampler: uniform, low: 0.0, high: 0.5}
        train.loss.w_rto:   {sampler: loguniform, low: 0.25, high: 4.0}
        train.lr:           {sampler: loguniform, low: 1.0e-5, high: 1.0e-4}

Only keys that change what a trial learns may be searched (TUNABLE); resources, storage,
tracking, model identity and evaluation stay fixed, so trials compare like with like. Every
key and the ends of every range are checked against the config schema before a trial runs:
a bad space fails in a second with a ConfigError naming tune.space.<key>.

An empty tune.space searches the default space for the method (`default_space`).
"""

from __future__ import annotations

from typing import Any

from derta.config import ConfigError, ExperimentConfig, SearchDim, set_dotted

TUNABLE = (
    "data.prefix.", "data.mix.", "train.loss.", "train.lr", "train.weight_decay", "train.warmup_ratio",
    "train.epochs", "train.max_steps", "train.grad_clip", "model.lora.",
)  # fmt: skip
DATA_PREFIX = "data."  # keys that change the training samples (each trial builds its own data)


def default_space(cfg: ExperimentConfig) -> dict[str, SearchDim]:
    """The issue's space, restricted to what the method uses: the prefix-length distribution
    when the mix has harmful-prefix samples, RTO weight and keep-rate when it has a transition
    term, the preference temperature for derta_pref, and lr around the configured one."""
    from derta.data.mix import resolve_mix
    from derta.train.trainer import transition_of

    _, amounts = resolve_mix(cfg.data.mix, cfg.train.method)
    space: dict[str, SearchDim] = {}
    if amounts.get("prefix"):
        space.update({
            "data.prefix.dist": SearchDim(sampler="choice", values=["public", "uniform", "beta", "geometric"]),
            "data.prefix.unit": SearchDim(sampler="choice", values=["word", "token"]),
            "data.prefix.p_zero": SearchDim(sampler="uniform", low=0.0, high=0.5),
            "data.prefix.beta_a": SearchDim(sampler="loguniform", low=0.3, high=3.0),
            "data.prefix.beta_b": SearchDim(sampler="loguniform", low=0.3, high=3.0),
            "data.prefix.geometric_p": SearchDim(sampler="loguniform", low=0.02, high=0.5),
        })  # fmt: skip
    transition = transition_of(cfg.train.method)
    if transition != "none":
        space["train.loss.w_rto"] = SearchDim(sampler="loguniform", low=0.25, high=4.0)
        space["train.loss.rto_keep"] = SearchDim(sampler="uniform", low=0.05, high=1.0)
    if transition == "pref":
        space["train.loss.beta"] = SearchDim(sampler="loguniform", low=0.03, high=1.0)
    space["train.lr"] = SearchDim(sampler="loguniform", low=cfg.train.lr / 3.0, high=cfg.train.lr * 3.0)
    return space


OBJECTIVES = {"proxy_score": "max", "transition_mean": "max", "transition_min": "max", "helpful_nll": "min"}


def check_objective(cfg: ExperimentConfig) -> None:
    """tune.metric must be one the training loop reports with every result (the proxy
    metrics, derta.tune.proxy), optimised in its own direction."""
    metric, mode = cfg.tune.metric, cfg.tune.mode
    if metric not in OBJECTIVES:
        raise ConfigError(f"tune.metric: {metric!r} is not reported with every Tune result; "
                          f"use one of {', '.join(OBJECTIVES)}")
    if mode != OBJECTIVES[metric]:
        raise ConfigError(f"tune.mode: {metric} is better when {'higher' if OBJECTIVES[metric] == 'max' else 'lower'}; "
                          f"set tune.mode: {OBJECTIVES[metric]}")


def space_dims(cfg: ExperimentConfig) -> dict[str, SearchDim]:
    """tune.space, or the default space when it is empty; validated (ConfigError)."""
    check_objective(cfg)
    dims = dict(cfg.tune.space) or default_space(cfg)
    for key, dim in dims.items():
        check_dim(cfg, key, dim)
    return dims


def _probe_values(dim: SearchDim) -> list[Any]:
    """Values that must all be valid for the key: every choice, or both ends of a range."""
    if dim.sampler == "choice":
        return list(dim.values or [])
    lo, hi = float(dim.low), float(dim.high)  # type: ignore[arg-type]
    if dim.sampler == "randint":
        return [int(lo), int(hi) - 1]
    if dim.sampler == "quniform":
        q = float(dim.q)  # type: ignore[arg-type]
        return [round(lo / q) * q, round(hi / q) * q]
    return [lo, hi]


def check_dim(cfg: ExperimentConfig, key: str, dim: SearchDim) -> None:
    where = f"tune.space.{key}"
    if not any(key == p.rstrip(".") or key.startswith(p) for p in TUNABLE):
        raise ConfigError(f"{where}: this key cannot be searched (searchable: {', '.join(p.rstrip('.') for p in TUNABLE)})")
    if dim.sampler != "choice":
        if not float(dim.low) < float(dim.high):  # type: ignore[arg-type]
            raise ConfigError(f"{where}: low ({dim.low}) must be below high ({dim.high})")
        if dim.sampler == "loguniform" and float(dim.low) <= 0:  # type: ignore[arg-type]
            raise ConfigError(f"{where}: loguniform needs low > 0 (got {dim.low})")
        if dim.sampler == "quniform" and not dim.q:
            raise ConfigError(f"{where}: sampler 'quniform' needs q")
        if dim.sampler == "randint" and (float(dim.low) != int(dim.low) or float(dim.high) != int(dim.high)):  # type: ignore[arg-type]
            raise ConfigError(f"{where}: randint needs integer low and high (high is exclusive)")
    for value in _probe_values(dim):
        try:
            set_dotted(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"{where}: value {value!r} is not valid for the config: {e}") from None


def to_tune(dims: dict[str, SearchDim]) -> dict[str, Any]:
    """SearchDims -> a Ray Tune param_space (flat: one entry per dotted key)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in dims.items():
        if d.sampler == "choice":
            out[key] = tune.choice(list(d.values or []))
        elif d.sampler == "uniform":
            out[key] = tune.uniform(float(d.low), float(d.high))  # type: ignore[arg-type]
        elif d.sampler == "loguniform":
            out[key] = tune.loguniform(float(d.low), float(d.high))  # type: ignore[arg-type]
        elif d.sampler == "randint":
            out[key] = tune.randint(int(d.low), int(d.high))  # type: ignore[arg-type]
        elif d.sampler == "quniform":
            out[key] = tune.quniform(float(d.low), float(d.high), float(d.q))  # type: ignore[arg-type]
        else:  # pragma: no cover - SearchDim's Literal forbids it
            raise ConfigError(f"tune.space.{key}: unknown sampler {d.sampler!r}")
    return out


def apply_params(cfg: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The trial's config: cfg with every sampled dotted key set, re-validated. Sorted keys, so
    the same point always gives the same config."""
    out = cfg
    for key in sorted(params):
        value = params[key]
        if hasattr(value, "item"):  # numpy scalars from the searchers
            value = value.item()
        out = set_dotted(out, key, value)
    return out


def changes_data(keys) -> bool:
    """Whether a trial's samples differ from the base config's (then it builds its own)."""
    return any(k.startswith(DATA_PREFIX) for k in keys)
