"""Raw sources -> normalized, validated records (one schema for every format).

A source (data.safety / data.helpful / data.prebuilt) is one of
  a local path or s3:// URI   a file or a directory of files: .jsonl/.ndjson, .json (an array
                              or JSON lines), .parquet, .csv (format=auto picks by extension)
  hf:<name or directory>      a Hugging Face dataset (datasets.load_from_disk for a directory,
                              load_dataset otherwise; needs the optional `datasets` package)
  builtin:demo                the project's synthetic corpus (derta.demo, train split)

Each raw row becomes one record with the columns of RECORD_SCHEMA. A bad row (unreadable
line, missing / empty / non-string field) does not raise where it is read: it becomes a
record whose `error` says what is wrong and where (`path:LINE: field 'safe' is empty`), so
the driver decides (data.on_bad_row: error -> ConfigError naming the first bad row in file
order; skip -> counted by reason in the manifest). Rows carry (fidx, row) so that line
numbers, limits and stable source ids survive Ray Data's parallel, streaming reads.

Roles and their fields (names mapped by SourceConfig.fields):
  safety   query, safe, harmful        one triple per row
  helpful  query, response             one pair per row
  prebuilt the public code's rows {prefix, text, safe} (format derta_public), parsed into
           pkind "rto" (safe == "true": text is the harmful response), "prefix" (a harmful
           prefix follows "[\\INST]" in prefix; text is the safe response) or "plain" (no
           prefix; the pipeline makes it a k = 0 prefix sample when the same query appears
           in a safety row, else a helpful sample).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa

from derta import storage
from derta.config import ConfigError, FieldMap, SourceConfig

ROLES = ("safety", "helpful", "prebuilt")
RECORD_SCHEMA = pa.schema(
    [
        ("fidx", pa.int32()),
        ("row", pa.int64()),
        ("loc", pa.string()),
        ("error", pa.string()),
        ("reason", pa.string()),
        ("source_id", pa.string()),
        ("query", pa.string()),
        ("safe", pa.string()),
        ("harmful", pa.string()),
        ("response", pa.string()),
        ("pkind", pa.string()),
    ]
)
TEXT_COLUMNS = ("query", "safe", "harmful", "response", "pkind")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
EOS_MARKERS = ("<|end_of_text|>", "<|eot_id|>", "</s>", "<|im_end|>", "<|endoftext|>")
_PUBLIC_PROMPT = re.compile(r"^\s*\[INST\]\s?(?P<q>.*?)\s?\[\\INST\](?P<rest>.*)$", re.S)
BUILTIN_DEMO = "builtin:demo"
BLOCK_ROWS = 4096


# --------------------------------------------------------------------------- validation
def role_fields(role: str, fields: FieldMap, fmt: str) -> list[tuple[str, str]]:
    """(record column, raw field name) pairs a row of this role must have."""
    if fmt == "derta_public" or role == "prebuilt":
        return [("prefix", "prefix"), ("text", "text"), ("safe", "safe")]
    if role == "safety":
        return [("query", fields.query), ("safe", fields.safe), ("harmful", fields.harmful)]
    if role == "helpful":
        return [("query", fields.query), ("response", fields.response)]
    raise ValueError(f"unknown role {role!r}")


def strip_eos(text: str) -> str:
    t = text.rstrip()
    changed = True
    while changed:
        changed = False
        for m in EOS_MARKERS:
            if t.endswith(m):
                t, changed = t[: -len(m)].rstrip(), True
    return t


def parse_public(prefix: str, text: str, safe: str) -> tuple[str, str, str | None, str | None]:
    """One public-format row -> (pkind, query, harmful, response); ValueError if malformed.

    prefix = "[INST] q [\\INST]" (+ " " + harmful prefix), text = " response<|end_of_text|>".
    """
    m = _PUBLIC_PROMPT.match(prefix)
    if not m or not m["q"].strip():
        raise ValueError("field 'prefix' is not '[INST] <query> [\\INST] ...'")
    query, rest = m["q"].strip(), m["rest"].strip()
    body = strip_eos(text).strip()
    if not body:
        raise ValueError("field 'text' is empty")
    flag = safe.strip().lower()
    if flag not in ("true", "false"):
        raise ValueError(f"field 'safe' must be 'true' or 'false', got {safe!r}")
    if flag == "true":  # an RTO row: text is the harmful response
        return "rto", query, body, None
    if rest:
        return "prefix", query, rest, body
    return "plain", query, None, body


def normalize(
    raw: Any, role: str, fields: FieldMap, fmt: str, optional: tuple[str, ...] = ()
) -> tuple[dict[str, str | None], str | None, str | None]:
    """A raw row -> (text columns, error message, reason key). Pure; never raises.

    optional: record columns that may be missing or empty (None then): the responses that
    data.generate will fill in.
    """
    out: dict[str, str | None] = dict.fromkeys(TEXT_COLUMNS)
    if not isinstance(raw, dict):
        return out, f"row is a {type(raw).__name__}, not an object", "not_an_object"
    values = {}
    for col, name in role_fields(role, fields, fmt):
        if col in optional and (raw.get(name) is None or (isinstance(raw[name], str) and not raw[name].strip())):
            values[col] = None
            continue
        if name not in raw or raw[name] is None:
            return out, f"missing field '{name}'", f"missing:{name}"
        v = raw[name]
        if isinstance(v, bool) and col == "safe" and (fmt == "derta_public" or role == "prebuilt"):
            v = "true" if v else "false"
        if not isinstance(v, str):
            return out, f"field '{name}' is not a string (got {type(v).__name__})", f"not_string:{name}"
        if not v.strip():
            return out, f"field '{name}' is empty", f"empty:{name}"
        values[col] = v
    if fmt == "derta_public" or role == "prebuilt":
        try:
            pkind, q, harmful, response = parse_public(values["prefix"], values["text"], values["safe"])
        except ValueError as e:
            return out, str(e), "bad_public_row"
        out.update(query=q, harmful=harmful, response=response, pkind=pkind)
        if pkind == "prefix":
            out["safe"], out["response"] = response, None
        elif pkind == "plain":
            out["safe"] = response  # used when the plain row turns out to be a safety row
        return out, None, None
    out.update(values)
    return out, None, None


# --------------------------------------------------------------------------- raw rows of a file
COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")


def _strip_compression(path: str) -> str:
    low = path.lower()
    for ext in COMPRESSED:
        if low.endswith(ext):
            return low[: -len(ext)]
    return low


def detect_format(path: str, fmt: str) -> str:
    """jsonl | jsonl_or_json | csv | parquet for one file (compressed text files allowed)."""
    if fmt not in ("auto",):
        return "jsonl_or_json" if fmt == "derta_public" else fmt
    for ext, name in EXTENSIONS.items():
        if _strip_compression(path).endswith(ext):
            return "jsonl_or_json" if name == "json" else name
    raise ConfigError(f"{path}: cannot tell the format from the extension; set format (jsonl, json, parquet, csv)")


def iter_raw(data: Any, path: str, fmt: str, open_random=None) -> Iterator[tuple[int, str, Any, str | None]]:
    """(row index, location for messages, raw row or None, parse error) for every row of a file.

    data: a binary file-like object. fmt: jsonl | json | jsonl_or_json | csv | parquet.
    """
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(open_random() if open_random else data)
        i = 0
        for batch in pf.iter_batches(batch_size=BLOCK_ROWS):
            for raw in batch.to_pylist():
                yield i, f"row {i + 1}", raw, None
                i += 1
        return
    if fmt == "csv":
        yield from _csv_rows(data)
        return
    head = data.read(1 << 16)
    if fmt in ("json", "jsonl_or_json") and head.lstrip()[:1] == b"[":
        buf = head + data.read()  # a JSON array is parsed whole
        try:
            items = json.loads(buf)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            yield 0, f"line {getattr(e, 'lineno', '?')}", None, f"invalid JSON array: {e}"
            return
        for i, raw in enumerate(items):
            yield i, f"item {i}", raw, None
        return
    i = 0
    for lineno, line in enumerate(_lines(head, data), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            yield i, str(lineno), None, f"invalid JSON: {e}"
        else:
            yield i, str(lineno), raw, None
        i += 1


def _csv_rows(data: Any) -> Iterator[tuple[int, str, Any, str | None]]:
    """CSV rows at their true line numbers. Bytes that are not UTF-8 are decoded as lone
    surrogates (never an exception that would end the file): such a row is a bad row at its
    line, and the rows after it are still read. A malformed row (csv.Error) likewise."""
    text = io.TextIOWrapper(data, encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.DictReader(text)
    i, start = 0, 2
    while True:
        try:
            raw = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if reader.line_num + 1 <= start:  # no progress: nothing more can be read
                yield i, str(start), None, f"unreadable CSV: {e}"
                return
            yield i, str(start), None, f"unreadable CSV: {e}"
            i, start = i + 1, reader.line_num + 1
            continue
        row = {k: v for k, v in raw.items() if k is not None}
        bad = next((k for k, v in row.items() if isinstance(v, str) and _SURROGATE.search(v)), None)
        if bad is not None or any(isinstance(k, str) and _SURROGATE.search(k) for k in row):
            yield i, str(start), None, f"not valid UTF-8 (field {_printable(bad)!r})"
        else:
            yield i, str(start), row, None
        i, start = i + 1, reader.line_num + 1


_SURROGATE = re.compile("[\udc80-\udcff]")


def _printable(text: Any) -> str:
    return _SURROGATE.sub("\ufffd", str(text))


def _lines(head: bytes, data: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a binary stream, read in chunks (a JSONL file is never held whole)."""
    pending = head
    while True:
        more = data.read(chunk)
        if not more:
            break
        pending += more
        *lines, pending = pending.split(b"\n")
        yield from lines
    yield from pending.split(b"\n")


# --------------------------------------------------------------------------- records
class RecordBuilder:
    """Accumulates normalized records into Arrow blocks."""

    def __init__(self, role: str, fields: FieldMap, fmt: str, display: str, sid_prefix: str, fidx: int,
                 optional: tuple[str, ...] = ()):
        self.role, self.fields, self.fmt, self.optional = role, fields, fmt, optional
        self.display, self.sid_prefix, self.fidx = display, sid_prefix, fidx
        self.cols: dict[str, list] = {f.name: [] for f in RECORD_SCHEMA}

    def add(self, row: int, loc: str, raw: Any, parse_error: str | None) -> None:
        if parse_error is not None:
            texts, err, reason = dict.fromkeys(TEXT_COLUMNS), parse_error, "bad_line"
        else:
            texts, err, reason = normalize(raw, self.role, self.fields, self.fmt, self.optional)
        c = self.cols
        c["fidx"].append(self.fidx)
        c["row"].append(row)
        c["loc"].append(loc)
        c["error"].append(f"{self.display}:{loc}: {err}" if err else None)
        c["reason"].append(reason)
        c["source_id"].append(f"{self.sid_prefix}{row}")
        for k in TEXT_COLUMNS:
            c[k].append(texts[k])

    def __len__(self) -> int:
        return len(self.cols["row"])

    def flush(self) -> pa.Table:
        t = pa.Table.from_pydict(self.cols, schema=RECORD_SCHEMA)
        self.cols = {f.name: [] for f in RECORD_SCHEMA}
        return t


def records_of(rows: Iterator[tuple[int, str, Any, str | None]], builder: RecordBuilder) -> Iterator[pa.Table]:
    for row, loc, raw, err in rows:
        builder.add(row, loc, raw, err)
        if len(builder) >= BLOCK_ROWS:
            yield builder.flush()
    if len(builder):
        yield builder.flush()


# --------------------------------------------------------------------------- resolving a source
@dataclass
class SourceSpec:
    role: str
    cfg: SourceConfig
    kind: str  # files | builtin | hf
    files: list[str] = field(default_factory=list)  # full URIs, sorted
    fmt: str = "auto"
    optional: tuple[str, ...] = ()  # columns data.generate fills (may be missing here)

    @property
    def uri(self) -> str:
        return self.cfg.uri

    def sid_prefix(self, fidx: int) -> str:
        """source_id = role:row for one file, role:<relative path>:row for several."""
        if self.kind != "files" or len(self.files) == 1:
            return f"{self.role}:"
        if storage.is_s3(self.cfg.uri):
            rel = self.files[fidx][len(self.cfg.uri.rstrip("/")) + 1 :]
        else:
            rel = os.path.relpath(self.files[fidx], os.path.abspath(self.cfg.uri))
        return f"{self.role}:{rel}:"


def resolve(src: SourceConfig, role: str) -> SourceSpec:
    """Where a source's rows are; ConfigError when nothing is there."""
    uri = src.uri
    fmt = "derta_public" if role == "prebuilt" and src.format == "auto" else src.format
    if uri == BUILTIN_DEMO:
        if role == "prebuilt":
            raise ConfigError("data.prebuilt.uri: builtin:demo has no pre-built rows; give a file in the public format")
        return SourceSpec(role, src, "builtin", fmt=fmt)
    if uri.startswith("builtin:"):
        raise ConfigError(f"data.{role}.uri: unknown builtin source {uri!r} (known: {BUILTIN_DEMO})")
    if uri.startswith("hf:") or fmt == "hf":
        return SourceSpec(role, src, "hf", fmt=fmt)
    try:
        found = storage.list_files(uri)
    except FileNotFoundError:
        found = []
    if found != [uri]:  # a directory / prefix: only data files, no hidden or _SUCCESS files
        found = [
            f for f in found
            if any(_strip_compression(f).endswith(e) for e in EXTENSIONS) and not os.path.basename(f).startswith((".", "_"))
        ]
    if not storage.is_s3(uri):
        found = [os.path.abspath(f) for f in found]
    if not found:
        raise ConfigError(f"data.{role}.uri: {uri}: no such file, or no data files (.jsonl .json .parquet .csv) under it")
    for f in found:
        detect_format(f, fmt)  # fail early on an unknown extension
    return SourceSpec(role, src, "files", files=sorted(found), fmt=fmt)


def file_records(spec: SourceSpec, fidx: int, f=None, open_random=None) -> Iterator[pa.Table]:
    """The records of one file of a source, as Arrow blocks (the driver or a read task)."""
    uri = spec.files[fidx]
    fmt = detect_format(uri, spec.fmt)
    builder = RecordBuilder(spec.role, spec.cfg.fields, spec.fmt, uri, spec.sid_prefix(fidx), fidx, spec.optional)
    if f is None:
        fs, path = storage.pyarrow_fs(uri)
        if fs is None:
            from pyarrow import fs as pafs

            fs = pafs.LocalFileSystem()
        with fs.open_input_stream(path, compression="detect") as stream:
            yield from records_of(iter_raw(stream, uri, fmt, lambda: fs.open_input_file(path)), builder)
        return
    yield from records_of(iter_raw(f, uri, fmt, open_random), builder)


def read_records_local(spec: SourceSpec) -> pa.Table:
    """All records of a source read in this process (small sources, tests, debugging)."""
    if spec.kind == "builtin":
        return builtin_records(spec)
    if spec.kind == "hf":
        return _normalize_table(_hf_table(spec), spec)
    tables = [t for i in range(len(spec.files)) for t in file_records(spec, i)]
    return pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()


# --------------------------------------------------------------------------- reading with Ray Data
def _file_datasource_cls():
    from ray.data.datasource import FileBasedDatasource

    class RecordsDatasource(FileBasedDatasource):
        """Reads each file as a stream, numbering rows, normalizing and validating them."""

        _FILE_EXTENSIONS = None

        def __init__(self, spec: SourceSpec, paths: list[str], filesystem, **kw):
            super().__init__(paths, filesystem=filesystem, **kw)
            self._spec = spec
            self._index = {self._key(p): i for i, p in enumerate(paths)}

        @staticmethod
        def _key(path: str) -> str:
            return path.lstrip("/")

        def _read_stream(self, f, path: str):
            yield from file_records(self._spec, self._index[self._key(path)], f, lambda: self._filesystem.open_input_file(path))

    return RecordsDatasource


def read_records(spec: SourceSpec):
    """The source as a ray.data.Dataset of RECORD_SCHEMA rows (streaming for files)."""
    import ray

    if spec.kind == "builtin":
        return ray.data.from_arrow(builtin_records(spec))
    if spec.kind == "hf":
        table = _hf_table(spec)
        return ray.data.from_arrow(table).map_batches(
            _normalize_table, batch_format="pyarrow", fn_kwargs={"spec": spec}, zero_copy_batch=True
        )
    fs, _ = storage.pyarrow_fs(spec.files[0])  # built here, used by the read tasks
    paths = [storage.pyarrow_fs(f)[1] for f in spec.files]
    cls = _file_datasource_cls()
    return ray.data.read_datasource(cls(spec, paths, fs))


def builtin_records(spec: SourceSpec) -> pa.Table:
    from dataclasses import asdict

    from derta import demo

    raws: list[dict]
    if spec.role == "safety":
        raws = [asdict(t) for t in demo.safety_triples("train")]
    else:
        raws = [asdict(h) for h in demo.helpful_pairs("train")]
    builder = RecordBuilder(spec.role, FieldMap(), "jsonl", BUILTIN_DEMO, spec.sid_prefix(0), 0, spec.optional)
    for i, raw in enumerate(raws):
        builder.add(i, f"row {i + 1}", raw, None)
    return builder.flush()


def _hf_table(spec: SourceSpec) -> pa.Table:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"data.{spec.role}.uri: {spec.uri} needs the Hugging Face `datasets` package "
            "(pip install datasets); or export the data to JSONL/Parquet"
        ) from None
    name = spec.uri[3:] if spec.uri.startswith("hf:") else spec.uri
    try:
        if os.path.isdir(name):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if spec.cfg.split not in ds:
                    raise ConfigError(f"data.{spec.role}.split: {spec.cfg.split!r} not in {list(ds)} ({spec.uri})")
                ds = ds[spec.cfg.split]
        else:
            ds = datasets.load_dataset(name, split=spec.cfg.split)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds
        raise ConfigError(f"data.{spec.role}.uri: cannot load {spec.uri}: {e}") from None
    table = ds.with_format("arrow")[:]
    return table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))


def _normalize_table(batch: pa.Table, spec: SourceSpec) -> pa.Table:
    rows = batch.to_pylist()
    builder = RecordBuilder(spec.role, spec.cfg.fields, spec.fmt, spec.uri, spec.sid_prefix(0), 0, spec.optional)
    for raw in rows:
        i = raw.pop("__row")
        builder.add(i, f"row {i + 1}", raw, None)
    return builder.flush()


def skip_summary(skipped: dict[str, int], trimmed: dict[str, int]) -> str | None:
    """One console line for the rows a build left out or trimmed (None when there were none)."""
    def part(what: str, counts: dict[str, int]) -> str:
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        more = ", ..." if len(top) > 5 else ""
        return f"{what}: {sum(counts.values())} (" + ", ".join(f"{k} {v}" for k, v in top[:5]) + more + ")"

    parts = [part(w, c) for w, c in (("rows skipped", skipped), ("samples trimmed", trimmed)) if c]
    return "data: " + "; ".join(parts) + " - see the manifest for details" if parts else None
