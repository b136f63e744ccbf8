"""One small I/O layer for every stage: a URI is a local path or `s3://bucket/key`.

Stages hand data to each other through URIs (docs/ARCHITECTURE.md), so the same code runs on a
laptop (`./runs`) and on a cluster (`s3://bucket/prefix`). S3-compatible stores (MinIO, R2,
Ceph, a loopback moto server in tests) are reached by setting `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`; credentials come from the standard AWS chain (env vars, profile, role).

Writes are atomic: a reader sees the old object or the new one, never half of one. Locally
that is a temp file in the same directory + `os.replace`; on S3 a single PUT (or a multipart
upload, which S3 also publishes only on completion).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from derta.config import redact_text

S3_SCHEME = "s3://"
DEFAULT_REGION = "us-east-1"
_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}

PathLike = str | os.PathLike


class StorageError(OSError):
    """An S3 request failed for a reason other than 'not found' (the message names the URI)."""


# --------------------------------------------------------------------------- URIs
def is_s3(uri: PathLike) -> bool:
    return str(uri).startswith(S3_SCHEME)


def join(uri: PathLike, *parts: PathLike) -> str:
    """Join path segments onto a local path or an s3:// URI (segments are always relative)."""
    base = str(uri)
    rel = [str(p).strip("/") for p in parts if str(p).strip("/")]
    if is_s3(base):
        return "/".join([base.rstrip("/"), *rel]) if rel else base
    return os.path.join(base, *rel)


def parse_s3(uri: PathLike) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b"); the key is "" for a bare bucket."""
    text = str(uri)
    if not is_s3(text):
        raise ValueError(f"not an s3:// URI: {text!r}")
    bucket, _, key = text[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {text!r}")
    return bucket, key


def _s3_uri(bucket: str, key: str) -> str:
    return f"{S3_SCHEME}{bucket}/{key}" if key else f"{S3_SCHEME}{bucket}"


# --------------------------------------------------------------------------- clients
def endpoint_url() -> str | None:
    """The S3 endpoint override, if any (AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def s3_client() -> Any:
    """A boto3 S3 client for the current endpoint/region/credentials (cached; clients are
    thread-safe and expensive to build)."""
    return _client(endpoint_url(), _region(), os.environ.get("AWS_ACCESS_KEY_ID"))


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, region: str | None, _key_id: str | None) -> Any:
    # Custom endpoints rarely support virtual-host buckets; path style works everywhere.
    # Retries: "standard" mode; AWS_MAX_ATTEMPTS / AWS_RETRY_MODE still apply.
    cfg = Config(
        retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard")},
        s3={"addressing_style": "path"} if endpoint else {},
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint, region_name=region or DEFAULT_REGION, config=cfg)


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turn botocore errors into FileNotFoundError / StorageError that name the URI."""
    try:
        yield
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in _NOT_FOUND:
            raise FileNotFoundError(redact_text(f"{uri}: not found ({code})")) from None
        raise StorageError(redact_text(f"{uri}: {e}")) from None
    except BotoCoreError as e:
        raise StorageError(redact_text(f"{uri}: {e}")) from None


def check_reachable(uri: PathLike, timeout: float = 5.0) -> None:
    """For an s3:// uri: one HEAD of its bucket with a short timeout and no retries, so an
    endpoint that never answers fails in seconds (the default client retries for minutes).
    Raises ConfigError naming the endpoint / bucket; local paths are not checked here."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

    from derta.config import ConfigError

    uri = str(uri)
    if not is_s3(uri):
        return
    bucket, _ = parse_s3(uri)
    where = endpoint_url() or "AWS S3"
    cfg = Config(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": 1},
                 s3={"addressing_style": "path"} if endpoint_url() else {})
    client = boto3.session.Session().client("s3", endpoint_url=endpoint_url(), region_name=_region() or DEFAULT_REGION,
                                            config=cfg)
    try:
        client.head_bucket(Bucket=bucket)
    except (ConnectTimeoutError, ReadTimeoutError, EndpointConnectionError) as e:
        raise ConfigError(redact_text(f"{uri}: the S3 endpoint {where} did not answer within {timeout:g}s "
                                      f"({type(e).__name__}); check AWS_ENDPOINT_URL and the network")) from None
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in _NOT_FOUND:
            raise ConfigError(f"{uri}: bucket {bucket!r} does not exist at {redact_text(where)}; create it first") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise ConfigError(f"{uri}: access to bucket {bucket!r} denied ({code}); check the AWS credentials") from None
        raise StorageError(redact_text(f"{uri}: {e}")) from None
    except BotoCoreError as e:
        raise ConfigError(redact_text(f"{uri}: cannot reach the S3 endpoint {where}: {e}")) from None


# --------------------------------------------------------------------------- read / write
def read_bytes(uri: PathLike) -> bytes:
    uri = str(uri)
    if not is_s3(uri):
        return Path(uri).read_bytes()
    bucket, key = parse_s3(uri)
    with _s3_errors(uri):
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def read_text(uri: PathLike, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def read_json(uri: PathLike) -> Any:
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: invalid JSON: {e}") from None


def read_jsonl(uri: PathLike) -> list[Any]:
    """One object per non-blank line; a bad line raises naming uri:line."""
    out = []
    for n, line in enumerate(read_text(uri).splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{uri}:{n}: invalid JSON: {e}") from None
    return out


def write_bytes(uri: PathLike, data: bytes) -> None:
    """Atomically replace the object at uri with data (parents created locally)."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        if not key:
            raise ValueError(f"{uri}: cannot write to a bare bucket")
        with _s3_errors(uri):
            s3_client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
        return
    parent = os.path.dirname(os.path.abspath(uri))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(uri)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs should be readable like any file
        os.replace(tmp, uri)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(uri: PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def write_json(uri: PathLike, obj: Any) -> None:
    # Serialised before anything is touched: an unserialisable object leaves the target intact.
    write_text(uri, json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------- listing
def exists(uri: PathLike) -> bool:
    """True for a file, a local directory, an s3 object, or an s3 prefix holding objects."""
    uri = str(uri)
    if not is_s3(uri):
        return os.path.exists(uri)
    bucket, key = parse_s3(uri)
    client = s3_client()
    if not key.strip("/"):
        try:
            with _s3_errors(uri):
                client.head_bucket(Bucket=bucket)
            return True
        except FileNotFoundError:
            return False
    try:
        with _s3_errors(uri):
            client.head_object(Bucket=bucket, Key=key)
        return True
    except FileNotFoundError:
        pass
    try:
        with _s3_errors(uri):
            page = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
    except FileNotFoundError:
        return False
    return page.get("KeyCount", 0) > 0


def _s3_keys(bucket: str, prefix: str, uri: str) -> Iterator[str]:
    with _s3_errors(uri):
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"]


def _dir_prefix(key: str) -> str:
    key = key.strip("/")
    return key + "/" if key else ""


def list_files(uri: PathLike, suffix: str | None = None) -> list[str]:
    """Every file under uri (recursive), as sorted full URIs; [] when nothing is there.

    A uri naming a single file lists just that file.
    """
    uri = str(uri)
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        keys = [k for k in _s3_keys(bucket, _dir_prefix(key), uri) if not k.endswith("/")]
        out = [_s3_uri(bucket, k) for k in keys]
        if not out and key.strip("/") and exists_file(uri):
            out = [uri]
    elif os.path.isfile(uri):
        out = [uri]
    else:
        out = [os.path.join(d, f) for d, _, files in os.walk(uri) for f in files]
    return sorted(u for u in out if suffix is None or u.endswith(suffix))


def exists_file(uri: PathLike) -> bool:
    """True only for a file / a single s3 object (not a directory or prefix)."""
    uri = str(uri)
    if not is_s3(uri):
        return os.path.isfile(uri)
    bucket, key = parse_s3(uri)
    if not key:
        return False
    try:
        with _s3_errors(uri):
            s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except FileNotFoundError:
        return False


def delete(uri: PathLike) -> None:
    """Remove a file or a whole directory/prefix; nothing there is not an error."""
    uri = str(uri)
    if not is_s3(uri):
        if os.path.isdir(uri) and not os.path.islink(uri):
            shutil.rmtree(uri)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(uri)
        return
    bucket, key = parse_s3(uri)
    keys = list(_s3_keys(bucket, _dir_prefix(key), uri))
    if key.strip("/"):
        keys.append(key)  # the object itself; deleting a missing key is a no-op on S3
    client = s3_client()
    for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        batch = [{"Key": k} for k in keys[i : i + 1000]]
        with _s3_errors(uri):
            resp = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        if resp.get("Errors"):
            raise StorageError(f"{uri}: could not delete {resp['Errors'][:3]}")


def makedirs(uri: PathLike) -> None:
    """Create a local directory (and parents); S3 has no directories, so a no-op there."""
    if not is_s3(uri):
        os.makedirs(str(uri), exist_ok=True)


# --------------------------------------------------------------------------- directories
def _local_files(local_dir: str) -> list[str]:
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"{local_dir}: not a directory")
    return sorted(
        os.path.relpath(os.path.join(d, f), local_dir) for d, _, files in os.walk(local_dir) for f in files
    )


def upload_dir(local_dir: PathLike, uri: PathLike) -> None:
    """Copy a local directory tree to uri (s3 prefix or another local directory).

    Each file lands atomically; large files go as multipart uploads.
    """
    local_dir, uri = str(local_dir), str(uri)
    rels = _local_files(local_dir)
    if not is_s3(uri):
        for rel in rels:
            dst = os.path.join(uri, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = f"{dst}.{os.getpid()}.tmp"
            try:
                shutil.copy2(os.path.join(local_dir, rel), tmp)
                os.replace(tmp, dst)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
                raise
        return
    bucket, key = parse_s3(uri)
    client = s3_client()
    for rel in rels:
        dst_key = _dir_prefix(key) + rel.replace(os.sep, "/")
        with _s3_errors(_s3_uri(bucket, dst_key)):
            client.upload_file(os.path.join(local_dir, rel), bucket, dst_key)


def download_dir(uri: PathLike, local_dir: PathLike) -> None:
    """Copy every file under uri into local_dir (created); FileNotFoundError if none."""
    uri, local_dir = str(uri), str(local_dir)
    if not is_s3(uri):
        upload_dir(uri, local_dir)
        return
    bucket, key = parse_s3(uri)
    prefix = _dir_prefix(key)
    keys = [k for k in _s3_keys(bucket, prefix, uri) if not k.endswith("/")]
    if not keys:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")
    client = s3_client()
    for k in keys:
        dst = _under(local_dir, k[len(prefix) :], uri)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        # s3transfer writes to a temp name and renames, so each file lands atomically.
        with _s3_errors(_s3_uri(bucket, k)):
            client.download_file(bucket, k, dst)


def _under(root: str, rel: str, uri: str) -> str:
    """root/rel for an object key rel, refused (StorageError) when '..' or an absolute key
    would put the file outside root: S3 keys are any string, and a bucket is not trusted."""
    parts = rel.split("/")
    if any(p in ("..", ".") for p in parts) or rel.startswith("/") or "\\" in rel or "\0" in rel:
        raise StorageError(redact_text(f"{uri}: object key {rel!r} would be written outside {root}; refused"))
    out = os.path.join(root, *[p for p in parts if p])
    base = os.path.realpath(root)
    if os.path.realpath(out) != base and not os.path.realpath(out).startswith(base + os.sep):
        raise StorageError(redact_text(f"{uri}: object key {rel!r} would be written outside {root}; refused"))
    return out


def default_cache_dir() -> str:
    """`$DERTA_CACHE/s3` (the project's cache root, as in derta.models), else ~/.cache/derta/s3."""
    return os.path.join(os.environ.get("DERTA_CACHE") or os.path.join(Path.home(), ".cache", "derta"), "s3")


def local_copy(uri: PathLike, cache_dir: PathLike | None = None) -> str:
    """A local path for uri: local paths as they are; an s3 file or prefix downloaded once.

    The copy lives at <cache_dir or default_cache_dir()>/{objects|prefixes}/<bucket>/<key> and
    appears only when complete (downloaded to a temp name, then renamed), so concurrent callers
    on one node never see a partial model directory. Single objects and prefixes have separate
    trees: a file copied out of a model directory (MLflow logs config.json alone) must not pass
    for the directory's copy. The cache assumes objects are immutable (checkpoints, exported
    models).
    """
    uri = str(uri)
    if not is_s3(uri):
        return uri
    bucket, key = parse_s3(uri)
    key = key.strip("/")
    single = exists_file(uri)
    root = os.path.join(str(cache_dir or default_cache_dir()), "objects" if single else "prefixes")
    target = _under(root, f"{bucket}/{key}", uri)
    if os.path.exists(target):
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    try:
        if single:
            staged = os.path.join(tmp, "file")
            with _s3_errors(uri):
                s3_client().download_file(bucket, key, staged)
        else:
            staged = os.path.join(tmp, "dir")
            download_dir(uri, staged)
        try:
            os.rename(staged, target)
        except OSError:
            if not os.path.exists(target):  # someone else won the race; else a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- pyarrow
def pyarrow_fs(uri: PathLike) -> tuple[Any, str]:
    """(filesystem, path) for pyarrow / Ray Data (`read_parquet(path, filesystem=fs)`).

    Local paths give (None, path). For s3 the filesystem carries the endpoint override, so Ray
    Data reaches the same store as boto3, and never any keys: these filesystems are pickled
    (Tune's tuner.pkl and Train's trainer.pkl land in the run directory), so credentials come
    from the AWS default chain of whichever process uses it (env, profile, instance role).
    """
    uri = str(uri)
    if not is_s3(uri):
        return None, uri
    bucket, key = parse_s3(uri)
    endpoint, region = endpoint_url(), _region()
    if not endpoint and not region:
        region = _bucket_region(bucket)  # AWS S3 proper: buckets live in one region each
    return _arrow_s3(endpoint, region), f"{bucket}/{key}".rstrip("/")


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str | None:
    from pyarrow import fs as pafs

    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return None


@functools.lru_cache(maxsize=8)
def _arrow_s3(endpoint: str | None, region: str | None) -> Any:
    return _new_arrow_s3(endpoint, region)


def _new_arrow_s3(endpoint: str | None, region: str | None) -> Any:
    """A pyarrow S3FileSystem with no keys of its own (see pyarrow_fs)."""
    from pyarrow import fs as pafs

    kwargs: dict[str, Any] = {"region": region or DEFAULT_REGION}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if not host:  # "host:port" without a scheme
            scheme, host = "https", endpoint
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    return pafs.S3FileSystem(**kwargs)
