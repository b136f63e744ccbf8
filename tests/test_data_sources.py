"""Source readers and validation: every bad-input rule names the file and the line (no Ray)."""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from derta.config import ConfigError, FieldMap, SourceConfig
from derta.data import sources as S

TRIPLE = {"query": "How do I make a zorblax?", "safe": "Sorry, I can't.", "harmful": "Sure, step 1."}

# Our own rows in the public code's format (same shape as its train_example_format.jsonl).
PUBLIC_ROWS = [
    {"prefix": "[INST] Suggest a card game for a party. [\\INST]",
     "text": " Uno is a good card game for a party.<|end_of_text|>", "safe": "false"},
    {"prefix": "[INST] How do I steal a zorblax from a shop? [\\INST]",
     "text": " I'm sorry, I cannot assist with that.<|end_of_text|>", "safe": "false"},
    {"prefix": "[INST] How do I steal a zorblax from a shop? [\\INST] To take it unnoticed:\n- Step 1: make a",
     "text": " I'm sorry, I cannot assist with that.<|end_of_text|>", "safe": "false"},
    {"prefix": "[INST] Give me tips to become a good zorblax thief. [\\INST]",
     "text": " Tips for stealing a zorblax:\n- Go when it is busy.\n- Hide it in a bag.<|end_of_text|>", "safe": "true"},
]  # fmt: skip


def _read(path, role="safety", **cfg) -> list[dict]:
    spec = S.resolve(SourceConfig(uri=str(path), **cfg), role)
    return S.read_records_local(spec).to_pylist()


def _jsonl(path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def test_jsonl_good_and_bad_rows(tmp_path):
    p = _jsonl(tmp_path / "s.jsonl", [
        TRIPLE,
        "{not json",
        {**TRIPLE, "safe": ""},
        {"query": "q", "harmful": "h"},
        {**TRIPLE, "harmful": 7},
        "",
        ["a", "list"],
        {**TRIPLE, "query": "   "},
        TRIPLE,
    ])  # fmt: skip
    rows = _read(p)
    assert [r["loc"] for r in rows] == ["1", "2", "3", "4", "5", "7", "8", "9"]  # blank line 6 ignored
    errs = [r["error"] for r in rows]
    assert errs[0] is None and errs[-1] is None
    assert errs[1].startswith(f"{p}:2: invalid JSON")
    assert errs[2] == f"{p}:3: field 'safe' is empty"
    assert errs[3] == f"{p}:4: missing field 'safe'"
    assert errs[4] == f"{p}:5: field 'harmful' is not a string (got int)"
    assert errs[5] == f"{p}:7: row is a list, not an object"
    assert errs[6] == f"{p}:8: field 'query' is empty"
    assert [r["reason"] for r in rows[1:-1]] == [
        "bad_line", "empty:safe", "missing:safe", "not_string:harmful", "not_an_object", "empty:query",
    ]  # fmt: skip
    assert rows[0]["source_id"] == "safety:0" and rows[-1]["source_id"] == "safety:7"
    assert rows[0]["query"] == TRIPLE["query"] and rows[0]["harmful"] == TRIPLE["harmful"]


def test_field_mapping_and_helpful_role(tmp_path):
    p = _jsonl(tmp_path / "h.jsonl", [{"instruction": "Bake bread", "output": "Mix flour."}, {"instruction": "x"}])
    rows = _read(p, "helpful", fields=FieldMap(query="instruction", response="output"))
    assert rows[0]["query"] == "Bake bread" and rows[0]["response"] == "Mix flour." and rows[0]["error"] is None
    assert rows[1]["error"] == f"{p}:2: missing field 'output'"


def test_json_array_csv_parquet(tmp_path):
    j = tmp_path / "a.json"
    j.write_text(json.dumps([TRIPLE, {**TRIPLE, "safe": None}]))
    rows = _read(j)
    assert rows[0]["error"] is None and rows[1]["error"] == f"{j}:item 1: missing field 'safe'"
    bad = tmp_path / "b.json"
    bad.write_text("[{\"query\": 1,")
    assert "invalid JSON array" in _read(bad)[0]["error"]
    c = tmp_path / "c.csv"
    c.write_text('query,safe,harmful\n"q1","s1","h1"\n"a\nmulti-line q","s2",""\n"q3","s3","h3"\n')
    rows = _read(c)
    assert [r["loc"] for r in rows] == ["2", "3", "5"]
    assert rows[1]["error"] == f"{c}:3: field 'harmful' is empty" and rows[2]["error"] is None
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.table({"query": ["q", "q2"], "safe": ["s", "s2"], "harmful": ["h", None]}), pqf)
    rows = _read(pqf)
    assert rows[0]["error"] is None and rows[1]["error"] == f"{pqf}:row 2: missing field 'harmful'"
    pq.write_table(pa.table({"query": ["q"], "safe": ["s"], "harmful": [3]}), pqf)
    assert _read(pqf)[0]["error"] == f"{pqf}:row 1: field 'harmful' is not a string (got int)"


def test_directory_source_ids(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    _jsonl(d / "a.jsonl", [TRIPLE, TRIPLE])
    _jsonl(d / "b.jsonl", [TRIPLE])
    (d / "_SUCCESS").write_text("")
    rows = _read(d)
    assert [r["source_id"] for r in rows] == ["safety:a.jsonl:0", "safety:a.jsonl:1", "safety:b.jsonl:0"]
    assert [r["fidx"] for r in rows] == [0, 0, 1]


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(ConfigError, match=r"data.safety.uri: .*nope.jsonl: no such file"):
        S.resolve(SourceConfig(uri=str(tmp_path / "nope.jsonl")), "safety")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no data files"):
        S.resolve(SourceConfig(uri=str(tmp_path / "empty")), "safety")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ConfigError, match="cannot tell the format"):
        S.resolve(SourceConfig(uri=str(tmp_path / "x.txt")), "safety")
    assert S.resolve(SourceConfig(uri=str(tmp_path / "x.txt"), format="jsonl"), "safety").files
    with pytest.raises(ConfigError, match="unknown builtin"):
        S.resolve(SourceConfig(uri="builtin:nope"), "safety")
    with pytest.raises(ConfigError, match="no pre-built rows"):
        S.resolve(SourceConfig(uri="builtin:demo"), "prebuilt")


def test_hf_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    spec = S.resolve(SourceConfig(uri="hf:someone/some-data"), "safety")
    with pytest.raises(ConfigError, match="needs the Hugging Face `datasets` package"):
        S.read_records_local(spec)


def test_builtin_demo():
    safety = S.read_records_local(S.resolve(SourceConfig(uri="builtin:demo"), "safety")).to_pylist()
    helpful = S.read_records_local(S.resolve(SourceConfig(uri="builtin:demo"), "helpful")).to_pylist()
    assert len(safety) == 240 and len(helpful) == 160
    assert all(r["error"] is None for r in safety + helpful)
    assert safety[3]["source_id"] == "safety:3" and helpful[0]["response"]


# --------------------------------------------------------------------------- public format
def test_public_rows(tmp_path):
    p = _jsonl(tmp_path / "train.jsonl", PUBLIC_ROWS)
    rows = _read(p, "prebuilt")
    assert [r["error"] for r in rows] == [None] * 4
    assert [r["pkind"] for r in rows] == ["plain", "plain", "prefix", "rto"]
    assert rows[0]["query"] == "Suggest a card game for a party." and rows[0]["response"] == "Uno is a good card game for a party."
    assert rows[1]["safe"] == "I'm sorry, I cannot assist with that."
    assert rows[2]["query"] == "How do I steal a zorblax from a shop?"
    assert rows[2]["harmful"] == "To take it unnoticed:\n- Step 1: make a" and rows[2]["safe"] == rows[1]["safe"]
    assert rows[3]["harmful"] == "Tips for stealing a zorblax:\n- Go when it is busy.\n- Hide it in a bag."
    assert rows[3]["safe"] is None and rows[3]["response"] is None


def test_public_bad_rows(tmp_path):
    p = _jsonl(tmp_path / "bad.jsonl", [
        {"prefix": "no inst here", "text": " x", "safe": "false"},
        {"prefix": "[INST] q [\\INST]", "text": "<|end_of_text|>", "safe": "false"},
        {"prefix": "[INST] q [\\INST]", "text": " x", "safe": "maybe"},
        {"prefix": "[INST] q [\\INST]", "text": " x"},
        {"prefix": "[INST] q [\\INST]", "text": " x", "safe": True},
    ])  # fmt: skip
    errs = [r["error"] for r in _read(p, "prebuilt")]
    assert errs[0] == f"{p}:1: field 'prefix' is not '[INST] <query> [\\INST] ...'"
    assert errs[1] == f"{p}:2: field 'text' is empty"
    assert errs[2] == f"{p}:3: field 'safe' must be 'true' or 'false', got 'maybe'"
    assert errs[3] == f"{p}:4: missing field 'safe'"
    assert errs[4] is None  # a JSON boolean is accepted


def test_strip_eos():
    assert S.strip_eos(" hi there<|end_of_text|>") == " hi there"
    assert S.strip_eos("a</s>\n") == "a"


def test_optional_columns_for_generation():
    texts, err, _ = S.normalize({"query": "q", "safe": "", "harmful": "h"}, "safety", FieldMap(), "jsonl", ("safe",))
    assert err is None and texts["safe"] is None and texts["harmful"] == "h"
    texts, err, _ = S.normalize({"query": "q", "harmful": "h"}, "safety", FieldMap(), "jsonl", ("safe",))
    assert err is None and texts["safe"] is None
    _, err, _ = S.normalize({"query": "q", "safe": 3, "harmful": "h"}, "safety", FieldMap(), "jsonl", ("safe",))
    assert err == "field 'safe' is not a string (got int)"
    _, err, _ = S.normalize({"query": "", "safe": "", "harmful": "h"}, "safety", FieldMap(), "jsonl", ("safe",))
    assert err == "field 'query' is empty"


def test_compressed_jsonl(tmp_path):
    import gzip

    p = tmp_path / "s.jsonl.gz"
    p.write_bytes(gzip.compress((json.dumps(TRIPLE) + "\n" + json.dumps({**TRIPLE, "safe": ""}) + "\n").encode()))
    rows = _read(p)
    assert rows[0]["error"] is None and rows[1]["error"] == f"{p}:2: field 'safe' is empty"


def test_hf_dataset_by_name_and_saved_dir(monkeypatch, tmp_path):
    """The hf: path with a stand-in `datasets` module (the real one is an optional extra)."""
    import types

    table = pa.table({"prompt": ["q1", "q2"], "answer": ["a1", ""]})

    class FakeDataset:  # ds.with_format("arrow")[:] -> pyarrow.Table, as in `datasets`
        def with_format(self, fmt):
            assert fmt == "arrow"
            return self

        def __getitem__(self, item):
            assert item == slice(None)
            return table

        def __len__(self):
            return table.num_rows

    class DatasetDict(dict):
        pass

    calls = []
    fake = types.SimpleNamespace(
        DatasetDict=DatasetDict,
        load_dataset=lambda name, split: calls.append((name, split)) or FakeDataset(),
        load_from_disk=lambda path: DatasetDict(train=FakeDataset()),
    )
    monkeypatch.setitem(sys.modules, "datasets", fake)
    fields = FieldMap(query="prompt", response="answer")
    rows = S.read_records_local(S.resolve(SourceConfig(uri="hf:org/helpful", fields=fields, split="train[:2]"), "helpful")).to_pylist()
    assert calls == [("org/helpful", "train[:2]")]
    assert rows[0]["query"] == "q1" and rows[0]["response"] == "a1" and rows[0]["source_id"] == "helpful:0"
    assert rows[1]["error"] == "hf:org/helpful:row 2: field 'answer' is empty"
    saved = tmp_path / "saved"
    saved.mkdir()
    rows = S.read_records_local(S.resolve(SourceConfig(uri=f"hf:{saved}", fields=fields), "helpful")).to_pylist()
    assert len(rows) == 2
    with pytest.raises(ConfigError, match="'test' not in"):
        S.read_records_local(S.resolve(SourceConfig(uri=f"hf:{saved}", fields=fields, split="test"), "helpful"))


def test_a_non_utf8_byte_is_one_bad_row_at_its_true_line_and_the_rest_is_read(tmp_path):
    # 240 rows, ~60 KB (the old reader decoded in 8 KB chunks: wrong line, then nothing more).
    lines = ["query,safe,harmful"] + [f'"question {i} ' + "x" * 200 + f'","safe {i}","harmful {i}"' for i in range(240)]
    data = "\n".join(lines).encode() + b"\n"
    at = data.index(b"question 150 ")  # row 151, on line 152
    data = data[:at] + b"\xff" + data[at + 1 :]
    c = tmp_path / "c.csv"
    c.write_bytes(data)
    rows = _read(c)
    assert len(rows) == 240
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["loc"] == "152" and "not valid UTF-8" in bad[0]["error"]
    assert rows[-1]["error"] is None and rows[-1]["safe"] == "safe 239"
    j = tmp_path / "j.jsonl"
    j.write_bytes(b"\n".join(json.dumps({**TRIPLE, "query": f"q{i}"}).encode() for i in range(5)).replace(b"q2", b"q\xff"))
    rows = _read(j)
    assert len(rows) == 5 and [r["loc"] for r in rows if r["error"]] == ["3"] and rows[4]["error"] is None


def test_skip_summary_line():
    assert S.skip_summary({}, {}) is None
    line = S.skip_summary({"bad_line": 1, "empty_field": 2}, {"prefix": 4})
    assert line == "data: rows skipped: 3 (empty_field 2, bad_line 1); samples trimmed: 4 (prefix 4) - see the manifest for details"
