"""MLflow tracking and registry, against the embedded SQLite store and a real `mlflow server`
started here on a free loopback port (and killed mid-run)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recsys import registry
from recsys.errors import RecsysError
from tests.conftest import ROOT, cli, compose_cfg, metrics_of

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
pytestmark = pytest.mark.slow
TEST_CONF = str(ROOT / "tests" / "conf")
SECRET = "pw-never-logged"


def train_args(data: Path, run_dir: Path, uri: str, *overrides: str) -> list[str]:
    """A short tracked run (20 steps, losses every 5) of DeepFM on the small data."""
    return [f"data.path={data}", "trainer=debug", "trainer.progress_bar=false",
            "logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri={uri}",
            f"hydra.run.dir={run_dir}", *overrides]  # fmt: skip


def client(uri: str):
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_of(run_dir: Path, uri: str):
    run_id = json.loads((run_dir / "mlflow" / "run.json").read_text())["run_id"]
    return client(uri).get_run(run_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts proxied into folder)."""
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
               str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/server.db",
               "--artifacts-destination", str(folder / "art")]  # fmt: skip
    log = open(folder / f"server-{time.time_ns()}.log", "w")  # noqa: SIM115 (kept for the server)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    stop(proc)
    pytest.skip(f"mlflow server did not start on 127.0.0.1:{port} (log in {folder})")


def stop(proc: subprocess.Popen) -> None:
    with __import__("contextlib").suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlruns.db"


@pytest.fixture(scope="module")
def tracked_run(small_data, store, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tracked"
    out = cli(*train_args(small_data, run_dir, store))
    assert out.returncode == 0, out.stderr
    return run_dir


def test_a_run_has_its_params_metrics_tags_and_artifacts(tracked_run, store, small_data):
    run = run_of(tracked_run, store)
    assert run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, metrics_of(tracked_run)
    assert params["trainer.max_steps"] == "20" and params["model._target_"].endswith("DeepFM")
    assert params["logger.mlflow.tracking_uri"] == store
    assert tags["model"] == "DeepFM" and tags["world_size"] == "1" and tags["state"] == "complete"
    assert tags["data.path"] == str(small_data)
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    c = client(store)
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")] == [5, 10, 15, 20]
    for key in ("train/lr", "train/samples_per_s", "validation/auc", "validation/logloss"):
        assert c.get_metric_history(run.info.run_id, key), key
    assert run.data.metrics["final/test/auc"] == pytest.approx(metrics["test"]["auc"])
    assert run.data.metrics["final/objective"] == pytest.approx(metrics["objective"]["value"])
    files = {a.path for a in c.list_artifacts(run.info.run_id, "run")}
    assert files == {f"run/{n}" for n in ("config.yaml", "metrics.json", "sharding_plan.txt",
                                          "model.pt")}  # fmt: skip
    assert list(tracked_run.glob("events.out.tfevents.*"))  # TensorBoard logged too


def test_register_promote_and_predict_by_alias_gives_the_run_dirs_scores(
    tracked_run, store, tmp_path, monkeypatch
):
    from recsys.predict import run as predict

    monkeypatch.setenv("RECSYS_CACHE", str(tmp_path / "cache"))
    version = registry.register(str(tracked_run), "ctr-deepfm", store)
    assert version.tags["objective.metric"] == "auc" and version.run_id
    registry.promote("ctr-deepfm", int(version.version), "production", tracking_uri=store)
    assert "production" in registry.list_models(store)
    sources = {"by_run": str(tracked_run), "by_alias": "models:/ctr-deepfm@production",
               "by_version": f"models:/ctr-deepfm/{version.version}"}  # fmt: skip
    for name, source in sources.items():
        cfg = compose_cfg(f"run={source}", f"output={tmp_path / name}", f"tracking_uri={store}",
                          "split=validation", config_name="predict")  # fmt: skip
        predict(cfg)
    scores = {n: pq.read_table(tmp_path / n).column("score") for n in ("by_run", "by_alias")}
    assert scores["by_alias"].equals(scores["by_run"]) and len(scores["by_run"]) > 0
    assert pq.read_table(tmp_path / "by_version").column("score").equals(scores["by_run"])


def test_promotion_of_a_worse_version_is_refused_and_recorded(tracked_run, store, tmp_path):
    worse = tmp_path / "worse"  # the same run, with a worse validation AUC on record
    shutil.copytree(tracked_run, worse, ignore=shutil.ignore_patterns("checkpoints", "mlflow"))
    metrics = metrics_of(worse)
    metrics["objective"]["value"] -= 0.05
    (worse / "metrics.json").write_text(json.dumps(metrics))
    good = registry.register(str(tracked_run), "ctr-refusal", store)
    bad = registry.register(str(worse), "ctr-refusal", store)
    registry.promote("ctr-refusal", int(good.version), "production", tracking_uri=store)
    with pytest.raises(RecsysError, match="worse than version 1's auc") as e:
        registry.promote("ctr-refusal", int(bad.version), "production", tracking_uri=store)
    assert "force=true" in str(e.value)
    c = client(store)
    assert c.get_model_version_by_alias("ctr-refusal", "production").version == good.version
    refused = c.get_model_version("ctr-refusal", bad.version).tags["promotion.production"]
    assert refused.startswith("production refused: auc")
    out = cli("promote", "name=ctr-refusal", f"version={bad.version}", "alias=production",
              "force=true", f"tracking_uri={store}", module="registry")  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert c.get_model_version_by_alias("ctr-refusal", "production").version == bad.version
    assert (
        "forced over"
        in c.get_model_version("ctr-refusal", bad.version).tags["promotion.production"]
    )


def test_a_sweep_logs_a_parent_run_and_a_child_per_trial_with_its_state(small_data, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    out = cli("--multirun", "--config-dir", TEST_CONF, "sweep=prune_fm", "logger=mlflow",
              f"logger.mlflow.tracking_uri={uri}", f"data.path={small_data}",
              f"hydra.sweep.dir={tmp_path / 'sweep'}")  # fmt: skip
    assert out.returncode == 0, out.stderr
    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name("recsys").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert parent.data.tags["sweep.study"] == "prune_fm" and parent.info.status == "FINISHED"
    assert parent.data.tags["trials.complete"] == "1" and parent.data.tags["trials.pruned"] == "1"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    states = {r.data.tags["sweep.trial"]: (r.data.tags["state"], r.info.status) for r in children}
    assert sorted(states.values()) == [("complete", "FINISHED"), ("pruned", "KILLED")]


def test_a_run_that_raises_is_ended_failed(small_data, tmp_path):
    from recsys.config import MLflowConfig
    from recsys.tracking import Loggers, MLflowLogger

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    cfg = compose_cfg(f"data.path={small_data}", "logger=mlflow")
    logger = MLflowLogger(MLflowConfig(tracking_uri=uri), cfg, tmp_path, resumed=False)
    with pytest.raises(RuntimeError), Loggers([logger]).ending_on_error(cfg):
        logger.scalar("train/loss", 0.5, 1)
        raise RuntimeError("the loss became nan")
    run = client(uri).get_run(logger.run_id)
    assert run.info.status == "FAILED" and run.data.tags["state"] == "failed"


def test_an_unreachable_server_stops_the_run_before_training_unless_not_required(
    small_data, tmp_path
):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = cli(*train_args(small_data, tmp_path / "a", uri))
    assert out.returncode == 2
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "tracking server" in errors[0] and "unreachable" in errors[0]
    assert "required=false" in errors[0] and "epoch 1 step" not in out.stdout
    out = cli(*train_args(small_data, tmp_path / "b", uri, "logger.mlflow.required=false",
                          "trainer.max_steps=5"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "training goes on without it" in out.stdout and metrics_of(tmp_path / "b")


def test_server_killed_mid_run_training_goes_on_then_sync_uploads_it(small_data, tmp_path):
    port = free_port()
    server = start_server(tmp_path, port)
    uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "MLFLOW_TRACKING_TOKEN": SECRET}
    with open(tmp_path / "train.out", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "recsys.train",
                                 *train_args(small_data, run_dir, uri)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            record = run_dir / "mlflow" / "run.json"
            while proc.poll() is None and not record.exists():
                time.sleep(0.1)
            stop(server)  # lost after the run was created, before training ended
            assert proc.wait(timeout=600) == 0, (tmp_path / "train.out").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    output = (tmp_path / "train.out").read_text()
    assert "lost" in output and "python -m recsys.registry sync run=" in output
    lines = (run_dir / "mlflow/metrics.jsonl").read_text().splitlines()
    kept = [json.loads(line) for line in lines]
    assert {"train/loss", "validation/auc"} <= {m["key"] for m in kept}
    server = start_server(tmp_path, port)  # back, on the same store
    try:
        run_id = registry.sync(str(run_dir), uri)
        c = client(f"http://127.0.0.1:{port}")
        run = c.get_run(run_id)
        assert run_id == json.loads((run_dir / "mlflow/run.json").read_text())["run_id"]
        assert run.info.status == "FINISHED" and "final/test/auc" in run.data.metrics
        losses = c.get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in losses) == [5, 10, 15, 20]
        assert {a.path for a in c.list_artifacts(run_id, "run")} >= {"run/model.pt"}
        registry.sync(str(run_dir), uri)  # nothing is uploaded twice
        assert len(c.get_metric_history(run_id, "train/loss")) == 4
        recorded = json.dumps([run.data.params, run.data.tags])
    finally:
        stop(server)
    # credentials never reach the logs, the config record or the tracking store
    files = [run_dir / "config.yaml", run_dir / "mlflow/run.json", *run_dir.glob(".hydra/*")]
    for text in [output, recorded, *(p.read_text() for p in files)]:
        assert SECRET not in text
    assert "alice:***@127.0.0.1" in (run_dir / "config.yaml").read_text()
