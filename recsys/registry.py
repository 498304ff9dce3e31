"""`python -m recsys.registry <command> key=value ...`: a model registry on MLflow.

    register run=<run dir> name=<model>           a run's model as the model's next version
    promote name=<model> version=<n> alias=<a>    point an alias (staging, production, ...) at it
    list                                          every model, its versions, aliases, objectives
    sync run=<run dir>                            upload what a lost tracking server missed

Each takes `tracking_uri=` (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db here).
`models:/<name>@<alias>` and `models:/<name>/<version>` resolve to a local copy of the run's
files (`resolve_run`), which predict, evaluate and export read as they read a run dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from recsys.config import cache_root
from recsys.errors import ConfigError, RecsysError, exit_on_user_error
from recsys.files import format_table, write_dir_atomic
from recsys.outputs import MASK
from recsys.tracking import (
    ARTIFACTS,
    RunRecord,
    absolute_uri,
    connect,
    default_uri,
    experiment_id,
    log_params,
    masked_uri,
    upload,
)

log = logging.getLogger("recsys")
OBJECTIVE = "objective"  # version tags: objective.metric, objective.value, .higher_is_better


@dataclass
class RegistryConfig:
    """The arguments of every command; each command says which it needs."""

    run: str | None = None
    name: str | None = None
    version: int | None = None
    alias: str | None = None
    force: bool = False
    tracking_uri: str | None = None


COMMANDS = {"register": ("run", "name"), "promote": ("name", "version", "alias"), "list": (),
            "sync": ("run",)}  # fmt: skip


def _run_dir(run: str) -> Path:
    run_dir = Path(run).expanduser()
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"run={run} is not a run dir of recsys.train (it has no config.yaml)")
    return run_dir


def _exists(client: Any, run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        client.get_run(run_id)
        return True
    except Exception:
        return False


def sync(run: str, tracking_uri: str | None = None) -> str:
    """Upload a run dir's record (params, every kept metric, final metrics, artifacts) to the
    store, creating the run there if it is missing; what is already there is not repeated."""
    from mlflow.entities import Metric

    run_dir = _run_dir(run)
    record = RunRecord(run_dir)
    info = record.info()
    uri = absolute_uri(tracking_uri) if tracking_uri else default_uri(info.get("tracking_uri"))
    if MASK in uri:
        raise ConfigError(
            f"the run was tracked at {uri}, whose credentials are not kept: give tracking_uri= "
            "or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    client = connect(uri)
    run_id = info.get("run_id") if info.get("tracking_uri") == masked_uri(uri) else None
    if not _exists(client, run_id):
        config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
        settings = (config.get("logger") or {}).get("mlflow") or {}
        name = info.get("experiment") or settings.get("experiment") or "recsys"
        exp = experiment_id(client, name, settings.get("artifact_location"), uri)
        tags = info.get("tags") or {"run_dir": str(run_dir.resolve()),
                                    "mlflow.runName": run_dir.name,
                                    "data.path": str(config["data"]["path"])}  # fmt: skip
        run_id = client.create_run(exp, tags=tags).info.run_id
        log_params(client, run_id, config)
        log.info("created MLflow run %s for %s in %s", run_id, run_dir, masked_uri(uri))
    kept = record.metrics()
    known: dict[str, set] = defaultdict(set)
    for key in {m["key"] for m in kept}:
        known[key] = {(h.step, h.value) for h in client.get_metric_history(run_id, key)}
    missing = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in kept
               if (m["step"], m["value"]) not in known[m["key"]]]  # fmt: skip
    for i in range(0, len(missing), 1000):
        client.log_batch(run_id, metrics=missing[i : i + 1000])
    # a run dir without a state or metrics.json is of a run that died before its end
    state = info.get("state") or ("complete" if (run_dir / "metrics.json").exists() else "failed")
    upload(client, run_id, run_dir, state, skip_existing=True)
    record.save(run_id=run_id, tracking_uri=masked_uri(uri), synced=True)
    log.info("synced %s to MLflow run %s in %s: %d metric values uploaded", run_dir, run_id,
             masked_uri(uri), len(missing))  # fmt: skip
    return run_id


def register(run: str, name: str, tracking_uri: str | None = None) -> Any:
    """A run's model as the next version of `name`, with its lineage as version tags."""
    run_dir = _run_dir(run)
    if not (run_dir / "model.pt").exists() or not (run_dir / "metrics.json").exists():
        raise ConfigError(f"run={run} has no finished model (model.pt, metrics.json): train it")
    uri = default_uri(tracking_uri)
    run_id = sync(run, uri)
    client = connect(uri)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    objective = metrics["objective"]
    config = OmegaConf.load(run_dir / "config.yaml")
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    tags = {
        f"{OBJECTIVE}.metric": objective["metric"],
        f"{OBJECTIVE}.value": repr(float(objective["value"])),
        f"{OBJECTIVE}.higher_is_better": str(bool(objective["higher_is_better"])).lower(),
        "run_dir": str(run_dir.resolve()),
        "data.path": str(config.data.path),
        "model": str(config.model.get("_target_", "")).rsplit(".", 1)[-1],
        "config": f"runs:/{run_id}/{ARTIFACTS}/config.yaml",
    }
    version = client.create_model_version(
        name, f"runs:/{run_id}/{ARTIFACTS}", run_id=run_id, tags=tags,
        description=f"{run_dir.resolve()}: validation {objective['metric']} "
        f"{objective['value']:.4g}",
    )  # fmt: skip
    log.info("registered %s version %s (run %s, %s %.4g)", name, version.version, run_id,
             objective["metric"], objective["value"])  # fmt: skip
    return version


def _objective(version: Any) -> tuple[str, float, bool]:
    tags = version.tags
    return (tags[f"{OBJECTIVE}.metric"], float(tags[f"{OBJECTIVE}.value"]),
            tags[f"{OBJECTIVE}.higher_is_better"] == "true")  # fmt: skip


def _version(client: Any, name: str, version: int | str) -> Any:
    try:
        return client.get_model_version(name, str(version))
    except Exception:
        raise ConfigError(
            f"{name} has no version {version}: see python -m recsys.registry list"
        ) from None


def promote(name: str, version: int, alias: str, force: bool = False,
            tracking_uri: str | None = None) -> str:  # fmt: skip
    """Point `alias` at a version, refused (and the refusal recorded) when its objective is
    worse than the current holder's, unless forced; returns why it was moved."""
    client = connect(default_uri(tracking_uri))
    candidate = _version(client, name, version)
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except Exception:
        holder = None
    metric, value, higher = _objective(candidate)
    reason = f"{alias}: first holder ({metric} {value:.4g})"
    if holder is not None and holder.version != candidate.version:
        held_metric, held, _ = _objective(holder)
        comparable = held_metric == metric
        worse = not comparable or (value < held if higher else value > held)
        than = f"version {holder.version}'s {held_metric} {held:.4g}"
        if worse and not force:
            why = "is not comparable with" if not comparable else "is worse than"
            refusal = f"{alias} refused: {metric} {value:.4g} {why} {than}"
            client.set_model_version_tag(name, candidate.version, f"promotion.{alias}", refusal)
            raise RecsysError(
                f"{name} version {candidate.version} not promoted to {alias}: {metric} "
                f"{value:.4g} {why} {than} (recorded on the version): pass force=true to "
                "promote it anyway"
            )
        verb = "forced over" if worse else "better than or equal to"
        reason = f"{alias}: {metric} {value:.4g}, {verb} {than}"
    client.set_registered_model_alias(name, alias, candidate.version)
    client.set_model_version_tag(name, candidate.version, f"promotion.{alias}", reason)
    log.info("%s version %s is now %s", name, candidate.version, reason)
    return reason


def list_models(tracking_uri: str | None = None) -> str:
    """A table of every registered model version: aliases, objective, run."""
    client = connect(default_uri(tracking_uri))
    rows = []
    for model in client.search_registered_models():
        aliases: dict[str, list[str]] = defaultdict(list)
        for alias, version in (model.aliases or {}).items():
            aliases[str(version)].append(alias)
        versions = client.search_model_versions(f"name = '{model.name}'")
        for v in sorted(versions, key=lambda v: int(v.version)):
            metric, value, _ = _objective(v) if f"{OBJECTIVE}.metric" in v.tags else ("", 0, 0)
            rows.append([model.name, str(v.version), ",".join(sorted(aliases[str(v.version)])),
                         f"{metric} {value:.4g}" if metric else "", v.run_id or "",
                         v.tags.get("run_dir", "")])  # fmt: skip
    header = ["name", "version", "aliases", "objective", "run", "run dir"]
    return format_table(header, rows) if rows else "no registered models"


def resolve_run(source: str, tracking_uri: str | None = None) -> Path:
    """A run dir as given, or a registered model's run files (models:/<name>@<alias> or
    models:/<name>/<version>) downloaded once into the cache."""
    if not source.startswith("models:/"):
        return Path(source).expanduser()
    import mlflow.artifacts

    uri = default_uri(tracking_uri)
    client = connect(uri)
    rest = source.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        try:
            version = client.get_model_version_by_alias(name, alias)
        except Exception:
            raise ConfigError(
                f"{source}: {name} has no alias {alias} in {masked_uri(uri)}: see python -m "
                "recsys.registry list"
            ) from None
    elif "/" in rest:
        name, number = rest.rsplit("/", 1)
        version = _version(client, name, number)
    else:
        raise ConfigError(f"{source} names no version: give models:/{rest}@<alias> or /<n>")
    store = hashlib.sha256(uri.encode()).hexdigest()[:12]
    local = cache_root() / "models" / store / name / f"v{version.version}"
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)

        def fill(tmp: Path) -> None:
            mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=ARTIFACTS,
                                                dst_path=str(tmp), tracking_uri=uri)  # fmt: skip

        try:
            write_dir_atomic(local, fill)
        except OSError:  # another process put it there first
            if not local.exists():
                raise
    log.info("%s is version %s of %s (run %s)", source, version.version, name, version.run_id)
    return local / ARTIFACTS


def parse(argv: list[str]) -> tuple[str, RegistryConfig]:
    """The command and its key=value arguments, checked."""
    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(f"give a command first: one of {', '.join(COMMANDS)} (then key=value)")
    command, args = argv[0], argv[1:]
    known = {f.name for f in fields(RegistryConfig)}
    for arg in args:
        key = arg.split("=", 1)[0]
        if "=" not in arg or key not in known:
            raise ConfigError(f"{arg}: not a key=value of recsys.registry; keys: {sorted(known)}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(RegistryConfig), OmegaConf.from_dotlist(args))
        cfg: RegistryConfig = OmegaConf.to_object(node)
    except Exception as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    if missing := [k for k in COMMANDS[command] if getattr(cfg, k) is None]:
        raise ConfigError(f"{command} needs {', '.join(f'{k}=' for k in missing)}")
    return command, cfg


def run(argv: list[str]) -> None:
    command, cfg = parse(argv)
    if command == "register":
        register(cfg.run, cfg.name, cfg.tracking_uri)
    elif command == "promote":
        promote(cfg.name, cfg.version, cfg.alias, cfg.force, cfg.tracking_uri)
    elif command == "list":
        print(list_models(cfg.tracking_uri))
    else:
        sync(cfg.run, cfg.tracking_uri)


def main(argv: list[str] | None = None) -> None:
    """Entry point; user errors (and an unreachable store) end with one line naming the fix."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)  # fmt: skip
    with exit_on_user_error():
        run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
