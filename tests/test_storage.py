"""Storage: round trips through a real S3 server (SeaweedFS), error messages, crash guarantees.

Mocks appear only where a failure must be injected (a dropped connection, a part that fails);
every transfer still goes to the real server.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
from pathlib import Path
from unittest import mock

import pytest
import urllib3
from minio import Minio
from minio.error import S3Error

from medcritical import storage
from medcritical.io import manifest
from medcritical.io.manifest import read_manifest, write_manifest
from medcritical.storage import (
    MANIFEST_NAME,
    BucketNotFoundError,
    ChecksumMismatchError,
    IncompleteUploadError,
    ObjectNotFoundError,
    RetryPolicy,
    StorageAuthError,
    StorageConfigError,
    StorageError,
    downloading,
)

PART = 5 * 1024 * 1024  # S3's minimum part size: a 12 MB file takes 3 parts


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    """Retries without the backoff sleeps; records the delays asked for."""
    delays: list[float] = []
    monkeypatch.setattr(storage.client, "RETRY", RetryPolicy(attempts=3, base_delay=0.01, sleep=delays.append))
    return delays


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A checkpoint-like folder: one multi-part file, small files, a nested one, an empty one."""
    root = tmp_path / "checkpoint"
    (root / "tokenizer").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(os.urandom(12_000_000))
    (root / "config.json").write_text(json.dumps({"hidden_size": 64}))
    (root / "tokenizer" / "vocab.json").write_text('{"a": 1}')
    (root / "empty.txt").write_bytes(b"")
    return root


def same_tree(a: Path, b: Path) -> bool:
    def files(root):  # the data, without the manifest a download writes
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and p.name != MANIFEST_NAME
        }

    return files(a) == files(b)


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.endswith(".partial")]


# --- URIs and environment (no server) ----------------------------------------------------------


def test_uri_parsing():
    assert storage.is_s3("s3://bucket/a") and not storage.is_s3("/data/s3/x") and not storage.is_s3(Path("x"))
    assert storage.parse_s3_uri("s3://my-bucket/runs/1/") == storage.S3Uri("my-bucket", "runs/1")
    assert storage.parse_s3_uri("s3://my-bucket") == storage.S3Uri("my-bucket", "")
    with pytest.raises(StorageConfigError, match="bucket name"):
        storage.parse_s3_uri("s3://B_ad/x")
    with pytest.raises(StorageConfigError, match=r"'\.\.'"):
        storage.parse_s3_uri("s3://bucket/a/../b")


def test_missing_or_malformed_endpoint_names_the_variable(monkeypatch, tmp_path):
    (tmp_path / "f").write_text("x")
    monkeypatch.delenv("MEDCRITICAL_S3_ENDPOINT", raising=False)
    with pytest.raises(StorageConfigError, match="MEDCRITICAL_S3_ENDPOINT is not set.*http://minio:9000"):
        storage.upload(tmp_path / "f", "s3://bucket/f")
    monkeypatch.setenv("MEDCRITICAL_S3_ENDPOINT", "minio:9000")
    with pytest.raises(StorageConfigError, match="not an http"):
        storage.download("s3://bucket/f", tmp_path / "g")
    monkeypatch.setenv("MEDCRITICAL_S3_ENDPOINT", "http://user:hunter2@minio:9000")
    with pytest.raises(StorageConfigError, match="contains credentials") as err:
        storage.download("s3://bucket/f", tmp_path / "g")
    assert "hunter2" not in str(err.value)
    monkeypatch.setenv("MEDCRITICAL_S3_ENDPOINT", "http://minio:9000")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
    with pytest.raises(StorageConfigError, match="AWS_SECRET_ACCESS_KEY not set"):
        storage.download("s3://bucket/f", tmp_path / "g")


# --- Retries (units: a mock raising, then succeeding) ------------------------------------------


def s3_error(code: str, status: int) -> S3Error:
    return S3Error(mock.Mock(status=status), code, code, "/b/k", "req", "host")


def test_retry_recovers_from_connection_errors(fast_retries):
    fn = mock.Mock(side_effect=[ConnectionResetError("reset"), urllib3.exceptions.ProtocolError("eof"), "ok"])
    assert storage.with_retries(fn, what="test") == "ok"
    assert fn.call_count == 3
    assert len(fast_retries) == 2 and fast_retries[0] <= fast_retries[1] * 2  # backoff grows (jittered)


def test_retry_on_5xx_but_not_on_403_404_or_local_errors(fast_retries):
    fn = mock.Mock(side_effect=[s3_error("SlowDown", 503), s3_error("InternalError", 500), "ok"])
    assert storage.with_retries(fn, what="test") == "ok"
    for exc in (s3_error("AccessDenied", 403), s3_error("NoSuchKey", 404), FileNotFoundError("x")):
        fn = mock.Mock(side_effect=exc)
        with pytest.raises(type(exc)):
            storage.with_retries(fn, what="test")
        assert fn.call_count == 1


def test_retry_gives_up_after_the_policy_attempts(fast_retries):
    fn = mock.Mock(side_effect=ConnectionRefusedError("refused"))
    with pytest.raises(ConnectionRefusedError):
        storage.with_retries(fn, what="test", policy=RetryPolicy(attempts=4, sleep=fast_retries.append))
    assert fn.call_count == 4 and len(fast_retries) == 3


def test_unreachable_endpoint_says_which_variable_to_check(monkeypatch, tmp_path):
    monkeypatch.setattr(storage.client, "RETRY", RetryPolicy(attempts=2, sleep=lambda s: None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    monkeypatch.setenv("MEDCRITICAL_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with pytest.raises(
        StorageError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}.*MEDCRITICAL_S3_ENDPOINT"
    ):
        storage.download("s3://bucket/x", tmp_path / "x")


# --- Round trips on the real server ------------------------------------------------------------


def test_single_file_round_trip(s3_env, s3_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    src = tmp_path / "metrics.json"
    src.write_text('{"accuracy": 0.7}')
    uri = f"s3://{s3_env}/runs/1/metrics.json"
    assert storage.upload(src, uri) == uri
    stat = s3_server.client().stat_object(s3_env, "runs/1/metrics.json")
    assert stat.metadata["x-amz-meta-sha256"] == storage.sha256_file(src)

    out = storage.download(uri, tmp_path / "back" / "m.json")
    assert out == tmp_path / "back" / "m.json" and out.read_bytes() == src.read_bytes()
    # Into an existing folder: keeps the object's name. To a prefix ending in '/': same.
    assert storage.download(uri, tmp_path / "back").name == "metrics.json"
    assert storage.upload(src, f"s3://{s3_env}/other/") == f"s3://{s3_env}/other/metrics.json"
    assert leftovers(tmp_path) == []
    assert s3_server.secret_key not in caplog.text


def test_folder_round_trip_multipart_with_checksums(s3_env, s3_server, checkpoint, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="medcritical.storage")
    uri = f"s3://{s3_env}/runs/1/sft"
    storage.upload(checkpoint, uri, part_size=PART, max_workers=4)

    client = s3_server.client()
    big = client.stat_object(s3_env, "runs/1/sft/model.safetensors")
    assert big.etag.endswith("-3"), "12 MB in 5 MiB parts is a 3-part multipart upload"
    manifest = json.loads(client.get_object(s3_env, f"runs/1/sft/{MANIFEST_NAME}").read())
    assert manifest["file_count"] == 4 and manifest["total_bytes"] == 12_000_000 + 19 + 8
    assert {e["path"]: (e["size"], e["sha256"]) for e in manifest["files"]} == {
        p.relative_to(checkpoint).as_posix(): (p.stat().st_size, storage.sha256_file(p))
        for p in checkpoint.rglob("*")
        if p.is_file()
    }

    out = storage.download(uri, tmp_path / "restored", part_size=PART, max_workers=4)  # 3 ranged GETs
    assert same_tree(checkpoint, out) and leftovers(out) == []
    # The manifest comes along: the same checksums, with this machine's mtimes.
    assert {(e.path, e.size, e.sha256) for e in read_manifest(out)} == {
        (e["path"], e["size"], e["sha256"]) for e in manifest["files"]
    }
    assert all(e.mtime_ns == (out / e.path).stat().st_mtime_ns for e in read_manifest(out))
    assert "uploaded 4/4 files" in caplog.text and "downloaded 4/4 files" in caplog.text
    assert s3_server.secret_key not in caplog.text


def test_rerun_skips_intact_files(s3_env, checkpoint, tmp_path, monkeypatch):
    uri = f"s3://{s3_env}/ckpt"
    storage.upload(checkpoint, uri, part_size=PART)
    storage.download(uri, tmp_path / "out")
    puts, gets, hashed = [], [], []
    monkeypatch.setattr(Minio, "put_object", spy(Minio.put_object, puts))
    monkeypatch.setattr(Minio, "get_object", spy(Minio.get_object, gets))
    storage.upload(checkpoint, uri, part_size=PART)
    monkeypatch.setattr(downloading, "file_sha256", spy(downloading.file_sha256, hashed))
    storage.download(uri, tmp_path / "out")
    assert [c[2] for c in puts] == [f"ckpt/{MANIFEST_NAME}"]  # only the manifest is rewritten
    assert [c[2] for c in gets] == [f"ckpt/{MANIFEST_NAME}"]  # only the manifest is read
    assert hashed == []  # the files the first download recorded are trusted while unchanged
    (tmp_path / "out" / "config.json").write_text('{"hidden_size": 65}')  # a local edit is noticed
    storage.download(uri, tmp_path / "out")
    assert same_tree(checkpoint, tmp_path / "out")


def spy(function, calls):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return wrapper


def test_download_retries_a_dropped_connection(s3_env, checkpoint, tmp_path, monkeypatch, fast_retries):
    uri = f"s3://{s3_env}/ckpt"
    storage.upload(checkpoint, uri, part_size=PART)
    real_get = Minio.get_object
    dropped = []

    def flaky_get(self, bucket, key, *args, **kwargs):
        if key.endswith("model.safetensors") and not dropped:
            dropped.append(key)
            raise urllib3.exceptions.ProtocolError("Connection reset by peer")
        return real_get(self, bucket, key, *args, **kwargs)

    monkeypatch.setattr(Minio, "get_object", flaky_get)
    out = storage.download(uri, tmp_path / "out", part_size=PART)
    assert dropped and len(fast_retries) == 1 and same_tree(checkpoint, out)


# --- Clear errors ------------------------------------------------------------------------------


def test_wrong_credentials(s3_env, monkeypatch, tmp_path, checkpoint):
    storage.upload(checkpoint, f"s3://{s3_env}/ckpt")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageAuthError) as err:
        storage.upload(checkpoint / "config.json", f"s3://{s3_env}/x.json")
    with pytest.raises(StorageAuthError) as err2:
        storage.download(f"s3://{s3_env}/ckpt", tmp_path / "out")
    for e in (err.value, err2.value):
        assert "AWS_ACCESS_KEY_ID" in str(e) and "AWS_SECRET_ACCESS_KEY" in str(e) and s3_env in str(e)
        assert "not-the-secret" not in str(e)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StorageAuthError, match="rejected the credentials"):
        storage.download(f"s3://{s3_env}/ckpt", tmp_path / "out")


def test_missing_bucket(s3_env, tmp_path, checkpoint):
    with pytest.raises(BucketNotFoundError, match="bucket 'no-such-bucket' does not exist.*create it"):
        storage.upload(checkpoint, "s3://no-such-bucket/ckpt")
    with pytest.raises(BucketNotFoundError, match="bucket 'no-such-bucket' does not exist.*create it"):
        storage.upload(checkpoint / "config.json", "s3://no-such-bucket/config.json")
    with pytest.raises(BucketNotFoundError, match="no-such-bucket"):
        storage.download("s3://no-such-bucket/ckpt", tmp_path / "out")


def test_missing_object(s3_env, tmp_path):
    with pytest.raises(ObjectNotFoundError, match="nothing there") as err:
        storage.download(f"s3://{s3_env}/never/written", tmp_path / "out")
    assert isinstance(err.value, FileNotFoundError)


# --- Crash guarantees --------------------------------------------------------------------------


def fail_part(n: int, key_suffix: str):
    """Make part `n` of objects ending in `key_suffix` fail, as a dropped node would."""
    real = Minio._upload_part

    def upload_part(self, bucket, key, data, headers, upload_id, part_number):
        if key.endswith(key_suffix) and part_number == n:
            raise RuntimeError("simulated crash while uploading a part")
        return real(self, bucket, key, data, headers, upload_id, part_number)

    return upload_part


def test_interrupted_upload_leaves_no_manifest(s3_env, s3_server, checkpoint, tmp_path, monkeypatch):
    uri = f"s3://{s3_env}/runs/1/sft"
    client = s3_server.client()
    storage.upload(checkpoint, uri, part_size=PART)  # a complete earlier version
    (checkpoint / "model.safetensors").write_bytes(os.urandom(12_000_000))  # the new one fails midway
    (checkpoint / "config.json").write_text('{"hidden_size": 128}')

    with monkeypatch.context() as m:
        m.setattr(Minio, "_upload_part", fail_part(2, "model.safetensors"))
        with pytest.raises(StorageError, match="no manifest was written.*rerun the step"):
            storage.upload(checkpoint, uri, part_size=PART)

    with pytest.raises(S3Error, match="NoSuchKey"):  # the old manifest went first, no new one came
        client.stat_object(s3_env, f"runs/1/sft/{MANIFEST_NAME}")
    uploads = client._list_multipart_uploads(s3_env, prefix="runs/1/sft/").uploads
    assert uploads == [], "the failed multipart upload was aborted"
    with pytest.raises(IncompleteUploadError, match=f"no manifest at {uri}/{MANIFEST_NAME}.*rerun the step"):
        storage.download(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    storage.upload(checkpoint, uri, part_size=PART)  # the rerun finishes the job
    assert same_tree(checkpoint, storage.download(uri, tmp_path / "out"))


def test_failed_multipart_upload_publishes_no_object(s3_env, s3_server, tmp_path, monkeypatch):
    big = tmp_path / "shard.bin"
    big.write_bytes(os.urandom(12_000_000))
    monkeypatch.setattr(Minio, "_upload_part", fail_part(3, "shard.bin"))
    with pytest.raises(StorageError, match="simulated crash"):
        storage.upload(big, f"s3://{s3_env}/shard.bin", part_size=PART)
    with pytest.raises(S3Error, match="NoSuchKey"):
        s3_server.client().stat_object(s3_env, "shard.bin")


def test_file_changing_during_upload_is_not_published(s3_env, s3_server, tmp_path, monkeypatch):
    big = tmp_path / "shard.bin"
    big.write_bytes(os.urandom(12_000_000))
    os.utime(big, ns=(0, 10**18))  # an old mtime: any later write moves it, however coarse the clock
    real = Minio._upload_part

    def upload_part(self, bucket, key, data, headers, upload_id, part_number):
        if part_number == 1:  # a step still writing the file while its first part goes up
            with big.open("r+b") as f:
                f.write(b"rewritten")
        return real(self, bucket, key, data, headers, upload_id, part_number)

    monkeypatch.setattr(Minio, "_upload_part", upload_part)
    with pytest.raises(ChecksumMismatchError, match="changed while it was being uploaded"):
        storage.upload(big, f"s3://{s3_env}/shard.bin", part_size=PART, max_workers=1)  # parts one after another
    with pytest.raises(S3Error, match="NoSuchKey"):
        s3_server.client().stat_object(s3_env, "shard.bin")
    assert s3_server.client()._list_multipart_uploads(s3_env).uploads == []  # the parts were aborted


@pytest.mark.parametrize("victim", ["config.json", "model.safetensors"])  # whole GET; ranged GETs
def test_corrupted_object_is_detected_on_download(s3_env, s3_server, checkpoint, tmp_path, victim):
    uri = f"s3://{s3_env}/ckpt"
    storage.upload(checkpoint, uri, part_size=PART)
    size = (checkpoint / victim).stat().st_size
    s3_server.client().put_object(s3_env, f"ckpt/{victim}", io.BytesIO(b"\0" * size), size)  # bit rot

    out = tmp_path / "out"
    with pytest.raises(ChecksumMismatchError, match=f"{uri}/{victim}: downloaded data does not match.*rerun"):
        storage.download(uri, out, part_size=PART)
    assert not (out / victim).exists() and leftovers(out) == []


def test_manifest_paths_cannot_escape_the_destination(s3_env, s3_server, tmp_path):
    body = json.dumps(
        {"format": "medcritical-folder/1", "files": [{"path": "../escaped.txt", "size": 1, "sha256": "0" * 64}]}
    ).encode()
    s3_server.client().put_object(s3_env, f"evil/{MANIFEST_NAME}", io.BytesIO(body), len(body))
    with pytest.raises(StorageError, match="unsafe path"):
        storage.download(f"s3://{s3_env}/evil", tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


# --- What steps use: materialize / publish -----------------------------------------------------


def test_local_paths_work_like_uris(checkpoint, tmp_path):
    # Inputs: a local path is used in place.
    assert storage.materialize(checkpoint, tmp_path / "work") == checkpoint
    assert not (tmp_path / "work").exists()
    with pytest.raises(ObjectNotFoundError, match="no such file or folder"):
        storage.materialize(tmp_path / "missing", tmp_path / "work")

    # Outputs: the same path is a no-op; another path gets a complete copy, replacing an old one.
    assert storage.publish(checkpoint, str(checkpoint)) == str(checkpoint)
    dest = tmp_path / "published" / "sft"
    storage.publish(checkpoint, dest)
    assert same_tree(checkpoint, dest)
    (checkpoint / "config.json").write_text("{}")
    (dest / "stale.bin").write_bytes(b"old")
    storage.publish(checkpoint, str(dest))
    assert same_tree(checkpoint, dest) and not (dest / "stale.bin").exists()
    storage.publish(checkpoint / "config.json", tmp_path / "one.json")
    assert (tmp_path / "one.json").read_text() == "{}"
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temporary siblings left
    with pytest.raises(StorageConfigError, match="into itself"):
        storage.publish(checkpoint, checkpoint / "inside")


def test_materialize_and_publish_s3(s3_env, checkpoint, tmp_path, monkeypatch):
    uri = f"s3://{s3_env}/runs/7/sft"
    assert storage.publish(checkpoint, uri) == uri
    local = storage.materialize(uri, tmp_path / "work")
    assert local == tmp_path / "work" / s3_env / "runs/7/sft"
    assert same_tree(checkpoint, local)
    # A step materializing its input again (a relative work folder here) reads nothing twice.
    monkeypatch.chdir(tmp_path)
    hashed = []
    monkeypatch.setattr(downloading, "file_sha256", spy(downloading.file_sha256, hashed))
    assert storage.materialize(uri, "work") == Path("work") / s3_env / "runs/7/sft"
    assert hashed == []
    single = storage.materialize(f"{uri}/config.json", tmp_path / "work2")
    assert single.read_bytes() == (checkpoint / "config.json").read_bytes()


def test_excluded_subfolders_stay_behind(s3_env, s3_server, tmp_path):
    """Steps leave their training checkpoints out of the published folder."""
    folder = tmp_path / "sft"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}")
    (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"x" * 100)
    (folder / "checkpoints.txt").write_text("a file, not the folder: kept")
    storage.upload(folder, f"s3://{s3_env}/run/sft", exclude_dirs=("checkpoints",))

    names = {o.object_name for o in s3_server.client().list_objects(s3_env, prefix="run/sft/", recursive=True)}
    assert names == {"run/sft/model/config.json", "run/sft/checkpoints.txt", f"run/sft/{MANIFEST_NAME}"}
    out = storage.download(f"s3://{s3_env}/run/sft", tmp_path / "restored")
    assert (out / "model" / "config.json").is_file() and not (out / "checkpoints").exists()


# -- fail before the work: the output probed at a step's start; abandoned multipart uploads aborted --------


def test_check_output_writes_and_removes_a_probe(s3_env, s3_server):
    storage.check_output(f"s3://{s3_env}/runs/eval")
    assert list(s3_server.client().list_objects(s3_env, recursive=True)) == []  # the probe is gone


def test_check_output_names_wrong_credentials_and_a_missing_bucket(s3_env, monkeypatch):
    with pytest.raises(BucketNotFoundError, match="bucket 'no-such-bucket' does not exist .*create it first"):
        storage.check_output("s3://no-such-bucket/runs/eval")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageAuthError, match="rejected the credentials .*check AWS_ACCESS_KEY_ID"):
        storage.check_output(f"s3://{s3_env}/runs/eval")


def _start_multipart(client, bucket, key):
    """Start a multipart upload and send one part, as a run killed mid-upload leaves it."""
    upload_id = client._create_multipart_upload(bucket, key, {})
    client._upload_part(bucket, key, os.urandom(PART), None, upload_id, 1)
    return upload_id


def _unfinished(client, bucket):
    return [(u.object_name, u.upload_id) for u in client._list_multipart_uploads(bucket).uploads]


def test_abandoned_multipart_uploads_are_aborted_by_the_next_writer(s3_env, s3_server, tmp_path):
    client = s3_server.client()
    _start_multipart(client, s3_env, "runs/sft/model/model.safetensors")
    _start_multipart(client, s3_env, "other/keep.bin")  # another output's upload is not ours to abort
    assert len(_unfinished(client, s3_env)) == 2
    storage.check_output(f"s3://{s3_env}/runs/sft")  # the rerun's step start
    assert [name for name, _ in _unfinished(client, s3_env)] == ["other/keep.bin"]
    # A single-file upload aborts only its own key's leftovers.
    _start_multipart(client, s3_env, "other/keep.bin.2")
    (tmp_path / "keep.bin").write_bytes(b"x")
    storage.upload(tmp_path / "keep.bin", f"s3://{s3_env}/other/keep.bin")
    assert [name for name, _ in _unfinished(client, s3_env)] == ["other/keep.bin.2"]


def test_a_saved_model_is_not_hashed_again_on_its_way_to_s3(s3_env, s3_server, tmp_path, monkeypatch):
    """A training step's manifest lends its checksums to the upload while the files are unchanged."""
    run = tmp_path / "sft"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.safetensors").write_bytes(os.urandom(300_000))
    (run / "model" / "config.json").write_text("{}")
    write_manifest(run, [run / "model"])  # what the training step writes last
    (run / "sft_loss.png").write_bytes(b"png")  # written after it: not in the manifest
    (run / "model" / "config.json").write_text('{"edited": 1}')  # changed after it: hashed again
    hashed = []
    monkeypatch.setattr(manifest, "file_sha256", spy(manifest.file_sha256, hashed))

    uri = f"s3://{s3_env}/run/sft"
    storage.upload(run, uri)
    assert sorted(Path(c[0]).name for c in hashed) == ["config.json", "sft_loss.png"]
    names = {o.object_name for o in s3_server.client().list_objects(s3_env, prefix="run/sft/", recursive=True)}
    assert names == {f"run/sft/{n}" for n in ("model/model.safetensors", "model/config.json", "sft_loss.png")} | {
        f"run/sft/{MANIFEST_NAME}"
    }
    out = storage.download(uri, tmp_path / "out")  # every byte checked against the uploaded manifest
    assert (out / "model" / "config.json").read_text() == '{"edited": 1}'
    assert (out / "model" / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()


def test_a_second_worker_cannot_overwrite_another_result(s3_env, tmp_path):
    """Two workers with separate local folders, one s3:// output: the second, with other settings
    (another fingerprint), is refused naming the URI and the change; the same work is re-published."""
    uri = f"s3://{s3_env}/run/sft"
    first, second = tmp_path / "worker1", tmp_path / "worker2"
    for folder, rate in ((first, 0.003), (second, 0.001)):
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "weights.bin").write_bytes(str(rate).encode() * 100)
        (folder / "fingerprint.json").write_text(json.dumps({"settings": {"learning_rate": rate}, "seed": 0}))
    storage.upload(first, uri)
    with pytest.raises(storage.OutputTakenError) as error:
        storage.upload(second, uri)
    message = str(error.value)
    assert uri in message and "settings.learning_rate: 0.003 -> 0.001" in message and str(second) not in message
    out = storage.download(uri, tmp_path / "check")
    assert (out / "model" / "weights.bin").read_bytes() == b"0.003" * 100  # the first result, whole
    storage.upload(first, uri)  # the same work again: allowed
