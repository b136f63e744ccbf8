"""Pass 1 of a build: scan every source, validate, hold out, and fix the mix (exactly).

Only a few numbers per row come back to the driver (position, error, two hashes) plus the
held-out triples' texts; the driver applies data.on_bad_row, source limits, the held-out
split and the exact mix counts (mix.py) before anything is written. The result, a Plan with
one small RolePlan per source, is shipped to the build actors, which apply the very same
per-row decisions (RolePlan.select) while streaming the sources a second time.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from derta.config import ConfigError, ExperimentConfig
from derta.data import mix as M
from derta.data import prefix as P
from derta.data import sources as S

HOLDOUT_SALT = "holdout"  # held-out split does not depend on data.seed (stable across trials)


@dataclass
class RolePlan:
    """What the build pass needs to know about one source (small; shipped to the actors)."""

    role: str
    seed: int
    holdout: float
    limit_key: tuple[int, int] | None  # last (fidx, row) kept, None = no limit
    sorted_u: np.ndarray  # u of the eligible rows, sorted (for ranks)
    kinds: M.KindPlan | None
    derta_pref: bool = False
    safety_qhash: np.ndarray | None = None  # prebuilt: queries seen in rto/prefix rows

    def select(self, rows: list[dict]) -> list[dict]:
        """Records (with kinds) for the rows of one batch that make samples."""
        keep = []
        for r in rows:
            if r["error"] is not None:
                continue
            if self.limit_key is not None and (r["fidx"], r["row"]) > self.limit_key:
                continue
            if self.role == "safety" and P.row_uniform("", r["source_id"], HOLDOUT_SALT) < self.holdout:
                continue
            keep.append(r)
        if self.role == "prebuilt":
            return [self._prebuilt(r) for r in keep]
        if not keep or self.kinds is None:
            return []
        u = np.array([P.row_uniform(self.seed, r["source_id"], "mix") for r in keep])
        out = []
        for r, rank in zip(keep, M.ranks(self.sorted_u, u)):
            kinds = self.kinds.kinds_at(int(rank))
            if kinds:
                out.append({**r, "kinds": kinds})
        return out

    def _safety_queries(self) -> set[int]:
        if not hasattr(self, "_qset"):
            self._qset = set(self.safety_qhash.tolist()) if self.safety_qhash is not None else set()
        return self._qset

    def _prebuilt(self, r: dict) -> dict:
        if r["pkind"] == "rto":
            return {**r, "kinds": ["pref" if self.derta_pref else "rto"]}
        if r["pkind"] == "prefix" or _qhash(r["query"]) in self._safety_queries():
            return {**r, "kinds": ["prefix"], "prefix_all": True}
        return {**r, "kinds": ["helpful"]}


def _qhash(q: str) -> int:
    return int.from_bytes(hashlib.sha256(q.strip().encode()).digest()[:8], "big", signed=True)


def _scan_batch(batch: pa.Table, seed: int, holdout: float) -> pa.Table:
    rows = batch.select(["source_id", "pkind", "query", "safe", "harmful"]).to_pylist()
    u_mix, u_hold, qh = [], [], []
    held_q, held_s, held_h = [], [], []
    for r in rows:
        sid = r["source_id"]
        role = sid.split(":", 1)[0]
        u_mix.append(P.row_uniform(seed, sid, "mix"))
        uh = P.row_uniform("", sid, HOLDOUT_SALT) if role == "safety" else 1.0
        u_hold.append(uh)
        hold = uh < holdout
        held_q.append(r["query"] if hold else None)
        held_s.append(r["safe"] if hold else None)
        held_h.append(r["harmful"] if hold else None)
        qh.append(_qhash(r["query"]) if role == "prebuilt" and r["pkind"] in ("rto", "prefix") and r["query"] else 0)
    return pa.table(
        {
            "fidx": batch["fidx"], "row": batch["row"], "error": batch["error"], "reason": batch["reason"],
            "source_id": batch["source_id"], "u_mix": pa.array(u_mix, pa.float64()),
            "u_hold": pa.array(u_hold, pa.float64()), "qhash": pa.array(qh, pa.int64()),
            "query": pa.array(held_q, pa.string()), "safe": pa.array(held_s, pa.string()),
            "harmful": pa.array(held_h, pa.string()),
        }
    )  # fmt: skip


def _scan(specs: list[S.SourceSpec], seed: int, holdout: float) -> dict[str, pa.Table]:
    """One streaming pass over all sources; the small per-row table of each role, in file order."""
    import ray

    ds = _union([S.read_records(spec) for spec in specs])
    ds = ds.map_batches(_scan_batch, batch_format="pyarrow", fn_kwargs={"seed": seed, "holdout": holdout})
    tables = [t for t in ray.get(list(ds.to_arrow_refs())) if t.num_rows]
    table = pa.concat_tables(tables) if tables else _scan_batch(S.RECORD_SCHEMA.empty_table(), seed, holdout)
    roles = np.array([sid.split(":", 1)[0] for sid in table["source_id"].to_pylist()], dtype=object)
    out = {}
    for spec in specs:
        sub = table.filter(pa.array(roles == spec.role)) if len(roles) else table
        order = np.lexsort((sub["row"].to_numpy(), sub["fidx"].to_numpy()))
        out[spec.role] = sub.take(pa.array(order, pa.int64()))
    return out


def _union(datasets: list):
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


@dataclass
class Plan:
    preset: str
    amounts: dict[str, Any]
    specs: list[S.SourceSpec]
    roles: dict[str, RolePlan]
    skipped: Counter
    heldout_rows: list[dict]
    sources: dict[str, Any]
    warnings: list[str]


def _active_sources(cfg: ExperimentConfig) -> list[tuple[str, Any]]:
    """prebuilt rows replace the safety/helpful sources (they are complete training sets)."""
    d = cfg.data
    if d.prebuilt is not None:
        return [("prebuilt", d.prebuilt)]
    return [(role, src) for role, src in (("safety", d.safety), ("helpful", d.helpful)) if src is not None]


def make_plan(cfg: ExperimentConfig) -> Plan:
    """Pass 1: scan every source (Ray Data), validate, split, and fix the mix."""
    from derta.preflight import check_data

    check_data(cfg)
    specs = [S.resolve(src, role) for role, src in _active_sources(cfg)]
    return _fix(cfg, specs, _scan(specs, cfg.data.seed, cfg.data.holdout))


LOCAL_SCAN_BYTES = 256 << 20  # `derta plan` counts rows in this process up to this much local data


def local_plan(cfg: ExperimentConfig, max_bytes: int = LOCAL_SCAN_BYTES) -> Plan | None:
    """The same Plan as make_plan, read in this process without Ray, when every source is
    builtin or a local file (at most max_bytes in all); None otherwise (s3://, hf:, big)."""
    import os

    specs = []
    for role, src in _active_sources(cfg):
        if src.uri.startswith(("s3://", "hf:")) or src.format == "hf":
            return None
        try:
            spec = S.resolve(src, role)
        except ConfigError:
            return None
        specs.append(spec)
    if sum(os.path.getsize(f) for spec in specs for f in spec.files) > max_bytes:
        return None
    d = cfg.data
    scanned = {}
    for spec in specs:
        table = _scan_batch(S.read_records_local(spec), d.seed, d.holdout)
        order = np.lexsort((table["row"].to_numpy(), table["fidx"].to_numpy()))
        scanned[spec.role] = table.take(pa.array(order, pa.int64()))
    return _fix(cfg, specs, scanned)


def _fix(cfg: ExperimentConfig, specs: list[S.SourceSpec], scanned: dict[str, pa.Table]) -> Plan:
    """Apply on_bad_row, limits, the held-out split and the exact mix to the scanned rows."""
    d = cfg.data
    preset, amounts = M.resolve_mix(d.mix, cfg.train.method)
    skipped: Counter = Counter()
    roles: dict[str, RolePlan] = {}
    heldout_rows: list[dict] = []
    sources: dict[str, Any] = {}
    warnings: list[str] = []
    for spec in specs:
        holdout = d.holdout if spec.role == "safety" else 0.0
        table = scanned[spec.role]
        limit_key = None
        if spec.cfg.limit is not None and table.num_rows > spec.cfg.limit:
            table = table.slice(0, spec.cfg.limit)
            limit_key = (int(table["fidx"][-1].as_py()), int(table["row"][-1].as_py()))
        errors = table["error"].to_pylist()
        bad = [i for i, e in enumerate(errors) if e is not None]
        if bad and d.on_bad_row == "error":
            more = f" ({len(bad) - 1} more bad rows; data.on_bad_row=skip skips and counts them)" if len(bad) > 1 else ""
            raise ConfigError(errors[bad[0]] + more)
        reasons = table["reason"].to_pylist()
        for i in bad:
            skipped[f"{spec.role}:{reasons[i]}"] += 1
        ok = np.array([e is None for e in errors], dtype=bool)
        n_ok = int(ok.sum())
        if n_ok == 0:
            what = f"all {len(errors)} rows are bad" if errors else "no rows"
            raise ConfigError(f"data.{spec.role}.uri: {spec.uri}: {what}")
        held = ok & (table["u_hold"].to_numpy() < holdout)
        if held.any():
            sub = table.filter(pa.array(held)).select(["source_id", "query", "safe", "harmful"]).to_pylist()
            heldout_rows.extend({"query": r["query"], "safe": r["safe"], "harmful": r["harmful"], "source_id": r["source_id"]} for r in sub)
        eligible = ok & ~held
        sorted_u = np.sort(table["u_mix"].to_numpy()[eligible])
        n_el = len(sorted_u)
        kinds_plan = None
        if spec.role == "safety":
            kinds_plan = M.plan_kinds(amounts, M.SAFETY_ORDER, n_el, shared=d.mix.triples == "shared")
        elif spec.role == "helpful":
            kinds_plan = M.plan_kinds(amounts, ("helpful",), n_el)
        if kinds_plan is not None:
            warnings.extend(f"{w} ({spec.role} source {spec.uri})" for w in kinds_plan.warnings)
        qhash = None
        if spec.role == "prebuilt":
            qh = table["qhash"].to_numpy()[ok]
            qhash = np.unique(qh[qh != 0])
        roles[spec.role] = RolePlan(
            role=spec.role, seed=d.seed, holdout=holdout, limit_key=limit_key, sorted_u=sorted_u,
            kinds=kinds_plan, derta_pref=preset == "derta_pref", safety_qhash=qhash,
        )  # fmt: skip
        sources[spec.role] = {
            "uri": spec.uri, "format": spec.fmt, "files": spec.files, "rows": len(errors),
            "valid": n_ok, "bad": len(bad), "heldout": int(held.sum()), "eligible": n_el,
            "kinds": kinds_plan.counts() if kinds_plan else None,
        }  # fmt: skip
    return Plan(preset, amounts, specs, roles, skipped, heldout_rows, sources, warnings)
