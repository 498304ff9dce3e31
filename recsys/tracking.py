"""Where a run's curves and results go: TensorBoard and/or MLflow behind one small interface.

Only rank 0 logs. MLflow is optional (the `mlflow` extra) and never stops training once it has
started: every metric it is given is also appended to `<run dir>/mlflow/metrics.jsonl`, and
`python -m recsys.registry sync run=<dir>` uploads what a lost server missed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit
from urllib.request import urlopen

from omegaconf import DictConfig, OmegaConf

from recsys.config import LoggerConfig, MLflowConfig
from recsys.errors import RecsysError
from recsys.files import write_json
from recsys.outputs import MASK, flat_hparams, flatten, mask_secrets

log = logging.getLogger("recsys")

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
RECORD_DIR = "mlflow"  # in the run dir: run.json (the MLflow run) and metrics.jsonl
ARTIFACTS = "run"  # the artifact folder a run's files go to; registered versions point at it
FILES = ("config.yaml", "metrics.json", "sharding_plan.txt")
PARENT_ATTR = "mlflow_parent_run_id"  # the study's parent run, kept in the Optuna study
STATUS = {"complete": "FINISHED", "pruned": "KILLED", "preempted": "KILLED", "failed": "FAILED"}


class TrackingError(RecsysError):
    """A tracking store that cannot be reached or used."""


class RunLogger(Protocol):
    """What the trainer and train.py log through."""

    def scalar(self, tag: str, value: float, step: int) -> None: ...

    def finish(self, cfg: DictConfig, metrics: dict, state: str, steps: int) -> None: ...


def masked_uri(uri: str) -> str:
    """A URI with its password (user:password@) masked, fit for logs and records."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", f":{MASK}@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def scrubbed(text: str, uri: str) -> str:
    """Text (an error message) with the URI's password masked wherever it appears."""
    password = urlsplit(uri).password
    return text.replace(password, MASK) if password else text


def absolute_uri(uri: str, base: Path | None = None) -> str:
    """A sqlite URI's relative file made absolute against the launch directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((base or Path.cwd()) / uri.removeprefix("sqlite:///"))
    return uri


def default_uri(uri: str | None = None) -> str:
    return absolute_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def _client(uri: str, timeout_s: float = 10.0) -> Any:
    """An MlflowClient that gives up on a lost server at once instead of retrying for minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(1, timeout_s)))
    if urlsplit(uri).password:  # MLflow prints run URLs, credentials included
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise TrackingError(
            "logger=mlflow needs MLflow: pip install 'recsys-lab[mlflow]' (or pip install mlflow)"
        ) from None
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def connect(uri: str, timeout_s: float = 10.0) -> Any:
    """A client of a store known to answer; one line naming the store and the fix otherwise."""
    shown = masked_uri(uri)
    if uri.startswith(("http://", "https://")):
        try:
            health = urlunsplit(urlsplit(uri)._replace(netloc=urlsplit(uri).netloc.split("@")[-1]))
            with urlopen(health.rstrip("/") + "/health", timeout=timeout_s) as response:
                response.read()
        except OSError as e:
            reason = getattr(e, "reason", None) or e
            raise TrackingError(
                f"the MLflow tracking server {shown} is unreachable ({reason}): start it, fix "
                "logger.mlflow.tracking_uri, or set logger.mlflow.required=false to train "
                "without it"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not os.access(folder, os.W_OK):
            raise TrackingError(
                f"logger.mlflow.tracking_uri={shown}: cannot write {folder}: choose a writable "
                "place for the sqlite file"
            )
    return _client(uri, timeout_s)


def experiment_id(client: Any, name: str, artifact_location: str | None, uri: str) -> str:
    """The experiment's id, created on first use; artifacts beside a sqlite store by default."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    if artifact_location is None and uri.startswith("sqlite:///"):
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def git_tags(cwd: Path = Path(__file__).parent) -> dict[str, str]:
    """The commit this code is at and whether its work tree differs from it."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        if out.returncode:
            raise OSError(out.stderr)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown"}
    dirty_flag = str(dirty).lower()
    return {"git.commit": commit, "git.dirty": dirty_flag, "mlflow.source.git.commit": commit}


def masked_config(cfg: DictConfig | dict) -> dict:
    """The resolved config as a container, credentials masked (as config.yaml has it)."""
    container = (
        cfg
        if isinstance(cfg, dict)
        else OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    )
    container = json.loads(json.dumps(container))
    mask_secrets(container.get("data") or {})
    tracking = (container.get("logger") or {}).get("mlflow") or {}
    if tracking.get("tracking_uri"):
        tracking["tracking_uri"] = masked_uri(tracking["tracking_uri"])
    return container


def run_tags(cfg: DictConfig, run_dir: Path, world_size: int) -> dict[str, str]:
    """What a run is, for filtering runs: model, data, code version, sweep trial, ranks."""
    model = str(cfg.model.get("_target_", "")).rsplit(".", 1)[-1]
    tags = {"model": model, "data.path": str(cfg.data.path), "world_size": str(world_size),
            "run_dir": str(run_dir.resolve()), "mlflow.runName": run_dir.name}  # fmt: skip
    tags |= git_tags()
    from recsys.sweep_trial import current_trial

    trial = current_trial()
    if trial is not None:
        tags |= {"sweep.study": trial.study.study_name, "sweep.trial": str(trial.number)}
        tags["mlflow.runName"] = f"{trial.study.study_name}/{trial.number}"
        if parent := trial.study.user_attrs.get(PARENT_ATTR):
            tags["mlflow.parentRunId"] = parent
    return tags


class RunRecord:
    """The run dir's own copy of what MLflow was told: run.json and every metric, one a line."""

    def __init__(self, run_dir: Path):
        self.folder = run_dir / RECORD_DIR
        self.info_path = self.folder / "run.json"
        self.metrics_path = self.folder / "metrics.jsonl"

    def info(self) -> dict:
        return json.loads(self.info_path.read_text()) if self.info_path.exists() else {}

    def save(self, **info: Any) -> None:
        write_json(self.info_path, self.info() | info)

    def append(self, key: str, value: float, step: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = {"key": key, "value": value, "step": step, "timestamp": int(time.time() * 1000)}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def final_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json's final figures as MLflow metrics."""
    final = {f"final/validation/{k}": v for k, v in metrics["validation"].items()}
    final |= {f"final/test/{k}": v for k, v in metrics["test"].items()}
    for entry in metrics["objectives"]:
        final[f"final/objective/{entry['metric']}"] = entry["value"]
    final["final/objective"] = metrics["objective"]["value"]
    final["final/samples_per_s"] = metrics["train"]["samples_per_s"]
    final["final/wall_time_s"] = metrics["wall_time_s"]
    return {k: float(v) for k, v in final.items() if isinstance(v, int | float)}


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def log_params(client: Any, run_id: str, config: DictConfig | dict) -> None:
    """The flattened resolved config, credentials masked, as the run's params."""
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in flatten(masked_config(config)).items()]
    for batch in _batches(params, 100):
        client.log_batch(run_id, params=batch)


def upload(
    client: Any,
    run_id: str,
    run_dir: Path,
    state: str,
    log_model: bool = True,
    skip_existing: bool = False,
) -> None:
    """The end of a run, from its run dir: final metrics, state, artifacts, and the run ended."""
    from mlflow.entities import Metric, RunTag

    existing = set(client.get_run(run_id).data.metrics) if skip_existing else set()

    metrics_file = run_dir / "metrics.json"
    ended = state not in ("failed", "preempted") and metrics_file.exists()
    metrics = json.loads(metrics_file.read_text()) if ended else None
    if metrics is not None:
        now, steps = int(time.time() * 1000), metrics["train"]["steps"]
        final = [Metric(k, v, now, steps) for k, v in final_metrics(metrics).items()
                 if k not in existing]  # fmt: skip
        client.log_batch(run_id, metrics=final)
        state = metrics.get("status", state)
    client.log_batch(run_id, tags=[RunTag("state", state)])
    for name in FILES:
        if (run_dir / name).exists():
            client.log_artifact(run_id, str(run_dir / name), ARTIFACTS)
    if log_model and (run_dir / "model.pt").exists():
        client.log_artifact(run_id, str(run_dir / "model.pt"), ARTIFACTS)
    if log_model and (run_dir / "export").is_dir():
        client.log_artifacts(run_id, str(run_dir / "export"), f"{ARTIFACTS}/export")
    client.set_terminated(run_id, STATUS.get(state, "FINISHED"))


class TensorBoardLogger:
    """Scalars during training, and the hyper-parameters with the final metrics at the end."""

    def __init__(self, run_dir: Path, purge_step: int | None, hparams: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
        self.hparams = hparams

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def finish(self, cfg: DictConfig, metrics: dict, state: str, steps: int) -> None:
        if self.hparams and state in ("complete", "pruned"):
            final = {f"validation/{k}": v for k, v in metrics["validation"].items()}
            final |= {f"test/{k}": v for k, v in metrics["test"].items()}
            final["train/samples_per_s"] = metrics["train"]["samples_per_s"]
            self.writer.add_hparams(flat_hparams(cfg), final, run_name=".", global_step=steps)
        self.writer.close()


class MLflowLogger:
    """One MLflow run per training run; a lost server is given up on, the run dir keeps all."""

    def __init__(self, settings: MLflowConfig, cfg: DictConfig, run_dir: Path, resumed: bool):
        self.settings, self.run_dir = settings, run_dir
        self.uri = absolute_uri(settings.tracking_uri, _launch_dir())
        self.record = RunRecord(run_dir)
        self.client: Any = None
        self.run_id: str | None = None
        try:
            self.client = connect(self.uri, settings.timeout_s)
            self.run_id = self._start_run(cfg, resumed)
        except TrackingError as e:
            if settings.required:
                raise
            log.warning("%s; training goes on without it (logger.mlflow.required=false)", e)
            self.client = None
        except Exception as e:
            self._give_up(e, "at start", raise_if_required=True)
        else:
            log.info("MLflow run %s in %s (experiment %s)", self.run_id, self.shown,
                     settings.experiment)  # fmt: skip

    def _start_run(self, cfg: DictConfig, resumed: bool) -> str:
        """A new MLflow run with the config's params and the run's tags, or a resumed one's."""
        import torch.distributed as dist

        settings, client, earlier = self.settings, self.client, self.record.info()
        if resumed and earlier.get("run_id") and earlier.get("tracking_uri") == self.shown:
            client.update_run(earlier["run_id"], status="RUNNING")
            return earlier["run_id"]
        exp = experiment_id(client, settings.experiment, settings.artifact_location, self.uri)
        ranks = dist.get_world_size() if dist.is_initialized() else 1
        tags = run_tags(cfg, self.run_dir, ranks)
        run_id = client.create_run(exp, tags=tags).info.run_id
        log_params(client, run_id, cfg)
        self.record.save(tags=tags, run_id=run_id, tracking_uri=self.shown,
                         experiment=settings.experiment)  # fmt: skip
        return run_id

    @property
    def shown(self) -> str:
        return masked_uri(self.uri)

    def _give_up(self, error: Exception, when: str, raise_if_required: bool = False) -> None:
        first = scrubbed((str(error).strip().splitlines() or [type(error).__name__])[0], self.uri)
        first = first[:200]
        if raise_if_required and self.settings.required:
            raise TrackingError(
                f"the MLflow store {self.shown} failed {when} ({first}): fix "
                "logger.mlflow.tracking_uri, or set logger.mlflow.required=false"
            ) from None
        self.client = None
        log.warning("MLflow store %s lost %s (%s): training goes on; the run dir keeps every "
                    "metric, upload them later with: python -m recsys.registry sync run=%s",
                    self.shown, when, first, self.run_dir)  # fmt: skip

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.record.append(tag, value, step)
        if self.client is not None and self.run_id is not None:
            try:
                self.client.log_metric(self.run_id, tag, value, step=step)
            except Exception as e:
                self._give_up(e, f"at step {step}")

    def finish(self, cfg: DictConfig, metrics: dict, state: str, steps: int) -> None:
        self.record.save(state=state)
        if self.client is None or self.run_id is None:
            return
        try:
            upload(self.client, self.run_id, self.run_dir, state, self.settings.log_model)
            self.record.save(synced=True)
        except Exception as e:
            self._give_up(e, "at the end of the run")


def _launch_dir() -> Path:
    """The directory the command was started in (Hydra's original cwd)."""
    try:
        from hydra.utils import get_original_cwd

        return Path(get_original_cwd())
    except ValueError:
        return Path.cwd()


class Loggers:
    """Every configured logger, called as one; empty on ranks other than 0."""

    def __init__(self, loggers: list[RunLogger]):
        self.loggers = loggers

    def scalar(self, tag: str, value: float, step: int) -> None:
        for logger in self.loggers:
            logger.scalar(tag, value, step)

    def finish(self, cfg: DictConfig, metrics: dict, state: str, steps: int) -> None:
        for logger in self.loggers:
            logger.finish(cfg, metrics, state, steps)
        self.loggers = []

    @contextmanager
    def ending_on_error(self, cfg: DictConfig) -> Iterator[None]:
        """A run that raises is ended as failed (or preempted) where it is tracked."""
        from recsys.preemption import Preempted

        try:
            yield
        except BaseException as e:
            state = "preempted" if isinstance(e, Preempted) else "failed"
            for logger in self.loggers:
                if isinstance(logger, MLflowLogger):
                    logger.finish(cfg, {}, state, 0)
                elif isinstance(logger, TensorBoardLogger):
                    logger.writer.close()
            self.loggers = []
            raise


def open_loggers(
    settings: LoggerConfig, cfg: DictConfig, run_dir: Path, resumed_at: int | None
) -> Loggers:
    """The configured loggers of a run; an unreachable required MLflow store raises first."""
    loggers: list[RunLogger] = []
    if settings.mlflow is not None:
        loggers.append(MLflowLogger(settings.mlflow, cfg, run_dir, resumed_at is not None))
    if settings.tensorboard is not None:
        # a resumed run's curves go on from its checkpoint, hiding what came after it before
        loggers.append(TensorBoardLogger(run_dir, resumed_at, settings.tensorboard.hparams))
    return Loggers(loggers)


@dataclass
class StudyRun:
    """A sweep's parent MLflow run: one per Optuna study, found again when the study resumes."""

    client: Any
    run_id: str

    @classmethod
    def open(cls, config: DictConfig, study: Any, sweep_dir: Path) -> StudyRun | None:
        """The study's parent run (None unless logger.mlflow is configured)."""
        node = OmegaConf.select(config, "logger.mlflow")
        if node is None:
            return None
        settings: MLflowConfig = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(MLflowConfig), node)
        )
        uri = absolute_uri(settings.tracking_uri)
        try:
            client = connect(uri, settings.timeout_s)
        except TrackingError as e:
            if settings.required:
                raise
            log.warning("%s; the sweep goes on without it", e)
            return None
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
                return cls(client, run_id)
            except Exception:  # another store than the one the study was first tracked in
                pass
        exp = experiment_id(client, settings.experiment, settings.artifact_location, uri)
        tags = {"mlflow.runName": study.study_name, "sweep.study": study.study_name,
                "sweep.dir": str(sweep_dir.resolve()), "kind": "study"} | git_tags()  # fmt: skip
        run_id = client.create_run(exp, tags=tags).info.run_id
        study.set_user_attr(PARENT_ATTR, run_id)
        return cls(client, run_id)

    def close(self, study: Any, failed: bool) -> None:
        """Trial counts and the best value on the parent; trials that died unlogged failed."""
        try:
            self._close(study, failed)
        except Exception as e:  # a lost server must not fail the sweep
            log.warning("the study's MLflow run %s was not closed: %s", self.run_id, e)

    def _close(self, study: Any, failed: bool) -> None:
        from collections import Counter

        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        counts = Counter(t.state.name.lower() for t in trials)
        for state, n in counts.items():
            self.client.set_tag(self.run_id, f"trials.{state}", str(n))
        done = [t for t in trials if t.state is TrialState.COMPLETE]
        if done and len(study.directions) == 1:
            self.client.log_metric(self.run_id, "best/objective", float(study.best_value))
            self.client.set_tag(self.run_id, "best.trial", str(study.best_trial.number))
        failed_numbers = {str(t.number) for t in trials if t.state is TrialState.FAIL}
        children = self.client.search_runs(
            [self.client.get_run(self.run_id).info.experiment_id],
            f"tags.mlflow.parentRunId = '{self.run_id}' and attributes.status = 'RUNNING'",
        )
        for child in children:
            if child.data.tags.get("sweep.trial") in failed_numbers:
                self.client.set_tag(child.info.run_id, "state", "failed")
                self.client.set_terminated(child.info.run_id, "FAILED")
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
