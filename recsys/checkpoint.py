"""Where the checkpoint is written and read: <run dir>/checkpoints/step-N.

Tables and their fused optimizer state go through torch.distributed.checkpoint, sharded as they
were trained, so N ranks' checkpoint loads into M ranks; the trainer's state (step, dense
optimizer, early stopping, evaluations) is written by rank 0, each rank's RNGs and data position
by that rank. Everything lands in a temporary directory renamed into place once complete, with a
manifest (every file and its size) written last.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from recsys.errors import ConfigError, RecsysError, is_write_failure, write_failed
from recsys.files import write_json

log = logging.getLogger(__name__)

FORMAT = "recsys.checkpoint/1"
MANIFEST = "manifest.json"
TRAINER_FILE = "trainer.pt"
_STEP_DIR = re.compile(r"step-(\d+)")


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def describe(model: nn.Module, settings: dict | None = None) -> dict:
    """What a checkpoint must agree on with the model it loads into: class and shapes, and the
    model config (`settings`) that made them, to name what differs in the user's terms."""
    tables = {
        t.name: [t.num_embeddings, t.embedding_dim] for t in model.ebc.embedding_bag_configs()
    }
    dense = {
        name: list(p.shape)
        for name, p in model.named_parameters()
        if not name.startswith("ebc.")  # the tables, described above
    }
    return {"model": f"{type(model).__module__}.{type(model).__qualname__}", "tables": tables,
            "dense": dense, "settings": settings or {}}  # fmt: skip


def check_compatible(manifest: dict, expected: dict, path: Path) -> None:
    """Raise one error naming what differs between a checkpoint's model and this run's."""
    if manifest["model"] != expected["model"]:
        raise ConfigError(
            f"checkpoint {path} holds a {manifest['model']}, this run builds a "
            f"{expected['model']}: use the run's own model config, or start over with "
            "trainer.resume=never (or another run dir)"
        )
    diffs = []
    for kind, unit in (("tables", "table"), ("dense", "layer")):
        saved, now = manifest[kind], expected[kind]
        for name in sorted(saved.keys() | now.keys()):
            old, new = saved.get(name), now.get(name)
            if old != new:
                diffs.append(f"{unit} {name}: checkpoint {_shape(old)}, this run {_shape(new)}")
    saved, now = manifest.get("settings"), expected["settings"]
    if diffs and saved and now:  # the model config keys that differ, not the shapes they make
        keys = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        named = [f"model.{k}: checkpoint {saved.get(k)}, this run {now.get(k)}" for k in keys]
        diffs = named or diffs
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise ConfigError(
            f"checkpoint {path} does not fit this run's model: {'; '.join(diffs[:3])}{more}: "
            "use the config the checkpoint was written with (see config.yaml in its run dir), "
            "or start over with trainer.resume=never (or another run dir)"
        )


def _first_line(error: BaseException) -> str:
    """The gist of an error; for DCP's, of the first rank's (they carry whole tracebacks)."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]  # (exception, traceback)
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _shape(shape: list[int] | None) -> str:
    return "absent" if shape is None else "x".join(map(str, shape))


def _sharded_state(model: nn.Module) -> dict:
    return {"model": model.state_dict(), "sparse_optimizer": model.fused_optimizer.state_dict()}


def _stored(state: dict) -> dict:
    """What DCP writes and reads of a sharded state (a collective): the same tensors, without
    the empty states of stateless tables (SGD, and the SGD under the row-sparse Adam), which it
    cannot store, and without the tables' optimizer when no rank's tables have a state."""
    optimizer = state["sparse_optimizer"]
    kept = {k: v for k, v in optimizer["state"].items() if v}
    stateful = torch.tensor(int(bool(kept)))
    dist.all_reduce(stateful, op=dist.ReduceOp.MAX)
    if not stateful:
        return {"model": state["model"]}
    return {**state, "sparse_optimizer": {**optimizer, "state": kept}}


def save(
    root: Path,
    step: int,
    model: nn.Module,
    trainer_state: dict,
    rank_state: dict,
    description: dict,
    keep_last: int,
) -> Path:
    """Write step-N under root (a collective: every rank calls it); keep the last `keep_last`."""
    rank = dist.get_rank()
    final = root / f"step-{step:09d}"
    tmp = root / f".{final.name}.tmp"
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(_stored(_sharded_state(model)), checkpoint_id=tmp)
        torch.save(rank_state, tmp / rank_file(rank))
        dist.barrier()
        if rank == 0:
            torch.save(trainer_state, tmp / TRAINER_FILE)
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            manifest = {"format": FORMAT, "step": step, "world_size": dist.get_world_size(),
                        **description, "files": files}  # fmt: skip
            write_json(tmp / MANIFEST, manifest)
            _replace(tmp, final)
            _prune(root, keep_last)
    except (Exception, CheckpointException) as e:  # a full disk: keep the complete ones
        if not is_write_failure(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        older = _step_dirs(root)
        kept = f"the previous checkpoint {older[0].name} is kept" if older else "no earlier one"
        raise write_failed(f"checkpoint step {step}", root, e, kept) from None
    dist.barrier()
    return final


def _replace(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an older final (a re-run's same step) is moved aside first."""
    old = final.parent / f".{final.name}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _prune(root: Path, keep_last: int) -> None:
    """Drop all but the newest keep_last checkpoints, and leftovers of interrupted writes."""
    for path in _step_dirs(root)[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".step-*"):
        shutil.rmtree(path, ignore_errors=True)


def _step_dirs(root: Path) -> list[Path]:
    """step-N directories under root, newest first."""
    found = [p for p in root.glob("step-*") if _STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def problem(path: Path) -> str | None:
    """Why path is not a complete checkpoint, or None when its manifest's files are all there."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"it has no {MANIFEST} (its writing was interrupted)"
    except (OSError, ValueError) as e:
        return f"its {MANIFEST} cannot be read ({e})"
    if manifest.get("format") != FORMAT:
        return f"it is not a recsys checkpoint (format {manifest.get('format')})"
    for name, size in manifest["files"].items():
        file = path / name
        if not file.exists():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, the manifest says {size}"
    return None


@dataclass
class Restored:
    """A checkpoint loaded into the model and optimizers, and the state that goes on from it."""

    path: Path
    manifest: dict
    trainer_state: dict
    rank_state: dict  # RNGs, data position, repairs: this rank's, or rank 0's on a new layout
    same_layout: bool  # written by as many ranks as now load it


def candidates(root: Path, resume: str) -> list[Path]:
    """Checkpoints to try, newest first: the run dir's (resume=auto), one given, or none."""
    if resume == "never":
        return []
    if resume != "auto":
        path = Path(resume)
        why = problem(path)
        if why:
            raise ConfigError(f"trainer.resume={resume} is not a complete checkpoint: {why}")
        return [path]
    usable = []
    for path in _step_dirs(root) if root.is_dir() else []:
        why = problem(path)
        if why:
            log.warning("skipping checkpoint %s: %s", path, why)
        else:
            usable.append(path)
    return usable


def restore(
    paths: list[Path], model: nn.Module, dense_optimizer: torch.optim.Optimizer, expected: dict
) -> Restored | None:
    """Load the first checkpoint of paths that reads back whole; None when paths is empty."""
    rank, world = dist.get_rank(), dist.get_world_size()
    failures = []
    for path in paths:
        manifest = json.loads((path / MANIFEST).read_text())
        check_compatible(manifest, expected, path)
        try:
            state = _sharded_state(model)
            dcp.load(_stored(state), checkpoint_id=path)  # in place, into state's tensors
            model.load_state_dict(state["model"])
            model.fused_optimizer.load_state_dict(state["sparse_optimizer"])
            trainer_state = torch.load(path / TRAINER_FILE, weights_only=False)
            dense_optimizer.load_state_dict(trainer_state.pop("dense_optimizer"))
            same_layout = manifest["world_size"] == world
            own = rank_file(rank if same_layout else 0)
            rank_state = torch.load(path / own, weights_only=False)
        except (Exception, CheckpointException) as e:  # unreadable: fall back to an older one
            why = _first_line(e)
            log.warning("checkpoint %s cannot be loaded (%s): trying an older one", path, why)
            failures.append(f"{path.name}: {why}")
            continue
        return Restored(path, manifest, trainer_state, rank_state, same_layout)
    if failures:
        raise RecsysError(
            f"no checkpoint in {paths[0].parent} could be loaded ({'; '.join(failures)}): move "
            "them aside, or start over with trainer.resume=never"
        )
    return None
