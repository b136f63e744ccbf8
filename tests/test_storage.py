"""derta.storage against the local filesystem and a real S3-compatible server on loopback."""

from __future__ import annotations

import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from derta import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """The same tests run on a local directory and on a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_uri_helpers():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x") and not storage.is_s3("runs/s3://x")
    assert storage.join("s3://b/p/", "a/", "/b.json") == "s3://b/p/a/b.json"
    assert storage.join("s3://b") == "s3://b"
    assert storage.join("/tmp/r", "a", "/b") == "/tmp/r/a/b"
    assert storage.parse_s3("s3://bucket/a/b.txt") == ("bucket", "a/b.txt")
    assert storage.parse_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="not an s3"):
        storage.parse_s3("/tmp/x")
    with pytest.raises(ValueError, match="without a bucket"):
        storage.parse_s3("s3:///key")


def test_round_trips(root):
    storage.makedirs(root)
    storage.write_bytes(storage.join(root, "a.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "d/e/t.txt"), "héllo")
    storage.write_json(storage.join(root, "d/m.json"), {"x": [1, 2], "y": None})
    assert storage.read_bytes(storage.join(root, "a.bin")) == b"\x00\x01"
    assert storage.read_text(storage.join(root, "d/e/t.txt")) == "héllo"
    assert storage.read_json(storage.join(root, "d/m.json")) == {"x": [1, 2], "y": None}
    assert storage.read_text(storage.join(root, "d/m.json")).startswith('{\n  "x"')  # indent=2
    storage.write_text(storage.join(root, "a.bin"), "overwritten")
    assert storage.read_text(storage.join(root, "a.bin")) == "overwritten"


def test_list_exists_delete(root):
    for name in ["b.json", "a.txt", "d/c.json", "d/e/f.json", "dx.json"]:
        storage.write_text(storage.join(root, name), name)
    everything = storage.list_files(root)
    assert everything == sorted(storage.join(root, n) for n in ["a.txt", "b.json", "d/c.json", "d/e/f.json", "dx.json"])
    assert storage.list_files(root, suffix=".txt") == [storage.join(root, "a.txt")]
    assert storage.list_files(storage.join(root, "d")) == [storage.join(root, "d/c.json"), storage.join(root, "d/e/f.json")]
    assert storage.list_files(storage.join(root, "a.txt")) == [storage.join(root, "a.txt")]
    assert storage.list_files(storage.join(root, "nothing")) == []

    assert storage.exists(storage.join(root, "a.txt"))
    assert storage.exists(storage.join(root, "d"))  # a directory / prefix
    assert not storage.exists(storage.join(root, "missing.txt"))
    assert not storage.exists(storage.join(root, "d/e/f"))  # a key prefix is not a file

    storage.delete(storage.join(root, "d"))  # the prefix only: "dx.json" stays
    assert not storage.exists(storage.join(root, "d"))
    assert storage.exists(storage.join(root, "dx.json"))
    storage.delete(storage.join(root, "a.txt"))
    storage.delete(storage.join(root, "a.txt"))  # deleting what is gone is fine
    assert storage.list_files(root) == [storage.join(root, "b.json"), storage.join(root, "dx.json")]


def test_missing_objects_name_the_uri(root):
    uri = storage.join(root, "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        storage.read_json(uri)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        storage.download_dir(storage.join(root, "nothing-here"), "/tmp/unused-derta-dir")


def test_missing_bucket(s3_server):
    assert not storage.exists("s3://no-such-bucket-derta/x")
    assert not storage.exists("s3://no-such-bucket-derta")
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-derta/x"):
        storage.read_bytes("s3://no-such-bucket-derta/x")


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out" / "m.json"
    storage.write_json(str(target), {"v": 1})

    with pytest.raises(TypeError):
        storage.write_json(str(target), {"v": object()})  # serialisation fails
    assert storage.read_json(str(target)) == {"v": 1}

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)  # fails after the temp file is fully written
    with pytest.raises(OSError, match="disk full"):
        storage.write_text(str(target), "new")
    monkeypatch.undo()
    assert storage.read_json(str(target)) == {"v": 1}
    assert os.listdir(target.parent) == ["m.json"]


def test_failed_s3_write_keeps_old_object(s3_bucket, monkeypatch):
    uri = s3_bucket + "/m.json"
    storage.write_json(uri, {"v": 1})
    with pytest.raises(TypeError):
        storage.write_json(uri, {"v": {1, 2}})
    assert storage.read_json(uri) == {"v": 1}
    with pytest.raises(ValueError, match="bare bucket"):
        storage.write_text(s3_bucket, "x")


def _make_tree(d) -> dict[str, bytes]:
    files = {"config.json": b"{}", "weights/model.safetensors": os.urandom(1024), "tok/vocab.txt": b"a\nb\n"}
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return files


def test_upload_download_dir(root, tmp_path):
    files = _make_tree(tmp_path / "src")
    dest = storage.join(root, "model")
    storage.upload_dir(str(tmp_path / "src"), dest)
    assert storage.list_files(dest) == sorted(storage.join(dest, rel) for rel in files)
    storage.download_dir(dest, str(tmp_path / "back"))
    for rel, data in files.items():
        assert (tmp_path / "back" / rel).read_bytes() == data


def _rels(directory: str) -> list[str]:
    return [os.path.relpath(os.path.join(d, f), directory) for d, _, names in os.walk(directory) for f in names]


def test_local_copy(s3_bucket, tmp_path):
    files = _make_tree(tmp_path / "src")
    storage.upload_dir(str(tmp_path / "src"), s3_bucket + "/hf/model")
    cache = tmp_path / "cache"

    local = storage.local_copy(s3_bucket + "/hf/model/", cache_dir=str(cache))
    assert os.path.isdir(local) and str(local).startswith(str(cache))
    assert open(os.path.join(local, "tok", "vocab.txt"), "rb").read() == files["tok/vocab.txt"]
    storage.delete(s3_bucket + "/hf")  # a second call is served from the cache, no download
    assert storage.local_copy(s3_bucket + "/hf/model", cache_dir=str(cache)) == local
    assert not [n for n in os.listdir(os.path.dirname(local)) if n.endswith(".tmp")]

    # A file copied out of a directory first (MLflow logs a model's config.json alone) does not
    # pass for the directory's copy.
    storage.upload_dir(str(tmp_path / "src"), s3_bucket + "/hf/other")
    one = storage.local_copy(s3_bucket + "/hf/other/tok/vocab.txt", cache_dir=str(cache))
    whole = storage.local_copy(s3_bucket + "/hf/other", cache_dir=str(cache))
    assert open(one, "rb").read() == files["tok/vocab.txt"] and sorted(_rels(whole)) == sorted(files)

    storage.write_text(s3_bucket + "/one.txt", "single")
    single = storage.local_copy(s3_bucket + "/one.txt", cache_dir=str(cache))
    assert open(single).read() == "single"
    assert storage.local_copy(str(tmp_path / "src")) == str(tmp_path / "src")  # local: unchanged
    with pytest.raises(FileNotFoundError, match="absent"):
        storage.local_copy(s3_bucket + "/absent", cache_dir=str(cache))


def test_endpoint_env_is_honoured(s3_bucket, s3_server, monkeypatch):
    storage.write_text(s3_bucket + "/x.txt", "via endpoint")
    # AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL: point the generic one somewhere dead.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    assert storage.endpoint_url() == s3_server
    assert storage.read_text(s3_bucket + "/x.txt") == "via endpoint"
    # Only the dead endpoint: the request fails and the error names the URI.
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(OSError, match=r"s3://.*/x\.txt"):
        storage.read_text(s3_bucket + "/x.txt")


def test_pyarrow_fs_parquet_round_trip(s3_bucket, tmp_path):
    table = pa.table({"input_ids": [[1, 2], [3]], "kind": ["rto", "prefix"]})
    fs, path = storage.pyarrow_fs(s3_bucket + "/data/part-0.parquet")
    assert fs is not None and path == s3_bucket[len("s3://") :] + "/data/part-0.parquet"
    pq.write_table(table, path, filesystem=fs)
    assert storage.list_files(s3_bucket + "/data", suffix=".parquet") == [s3_bucket + "/data/part-0.parquet"]
    fs2, dir_path = storage.pyarrow_fs(s3_bucket + "/data/")
    assert pq.read_table(dir_path, filesystem=fs2).to_pylist() == table.to_pylist()

    local_fs, local_path = storage.pyarrow_fs(str(tmp_path / "p.parquet"))
    assert local_fs is None and local_path == str(tmp_path / "p.parquet")


def test_pyarrow_fs_never_carries_keys(s3_bucket, monkeypatch):
    """Filesystems get pickled into Tune/Train state under the run directory: no key may ride
    along (issue 18). Each process resolves credentials from its own chain."""
    secret = "NeverPickled/S3cret+Key"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    plain, _ = storage.pyarrow_fs(s3_bucket + "/d/p.parquet")
    fs, path = storage.pyarrow_fs(s3_bucket + "/d/p.parquet")
    assert path == s3_bucket[len("s3://") :] + "/d/p.parquet" and fs.equals(plain)
    assert secret.encode() not in pickle.dumps(fs)
    pq.write_table(pa.table({"x": [1, 2]}), path, filesystem=pickle.loads(pickle.dumps(fs)))
    assert pq.read_table(path, filesystem=plain).to_pylist() == [{"x": 1}, {"x": 2}]
    assert storage.pyarrow_fs("/tmp/p.parquet") == (None, "/tmp/p.parquet")


def test_read_jsonl_skips_blank_lines_and_names_a_bad_line(tmp_path):
    from derta import storage

    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert storage.read_jsonl(str(path)) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=rf"{path}:2: invalid JSON"):
        storage.read_jsonl(str(path))
