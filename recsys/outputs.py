"""What a run leaves in its run dir: resolved config, metrics.json, the exported model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from recsys.config import RETRIEVAL_KEYS
from recsys.data.features import FeatureSpec
from recsys.errors import RecsysError
from recsys.files import write_atomic, write_text
from recsys.models import unfold_first_order

MODEL_FILE = "model.pt"
MODEL_FORMAT = "recsys.model/1"


def set_aside_earlier_run(run_dir: Path) -> Path | None:
    """Move an earlier run's checkpoints, TensorBoard files and MLflow record out of a fresh
    run's way."""
    kept = [run_dir / "checkpoints", run_dir / "mlflow", *run_dir.glob("events.out.*")]
    earlier = [p for p in kept if p.exists()]
    if not earlier:
        return None
    aside = run_dir / "earlier" / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True)
    for path in earlier:
        path.rename(aside / path.name)
    return aside


SECRET_KEYS = ("access_key", "secret_key")
MASK = "***"  # what a credential is written as


def secrets(cfg: DictConfig) -> list[str]:
    """Credential values in the config, which must never reach a file or a log."""
    s3 = cfg.data.get("s3") or {}
    uri = OmegaConf.select(cfg, "logger.mlflow.tracking_uri", default=None)
    password = urlsplit(uri).password if uri else None  # http://user:password@host
    return [str(s3[k]) for k in SECRET_KEYS if s3.get(k)] + ([password] if password else [])


def mask_secrets(data: Any) -> None:
    """Write a data config's credentials (where given) as MASK."""
    s3 = data.get("s3") or {}
    for k in SECRET_KEYS:
        if s3.get(k):
            s3[k] = MASK


def unmask_secrets(data: Any) -> None:
    """Masked credentials of a saved data config to None: AWS's own chain then supplies them."""
    s3 = data.get("s3") or {}
    for k in SECRET_KEYS:
        if s3.get(k) == MASK:
            s3[k] = None


def save_config(run_dir: Path, cfg: DictConfig) -> None:
    """The fully resolved config, as this run saw it, credentials masked."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    mask_secrets(container["data"])
    text = OmegaConf.to_yaml(OmegaConf.create(container))
    for value in secrets(cfg):
        text = text.replace(value, MASK)
    write_text(run_dir / "config.yaml", text)


def mask_in_files(folder: Path, values: list[str]) -> None:
    """Replace secret values in every file under folder (Hydra's own record of the run)."""
    for path in folder.rglob("*") if values and folder.exists() else []:
        if path.is_file():
            text = path.read_text()
            masked = text
            for v in values:
                masked = masked.replace(v, MASK)
            if masked != text:
                write_text(path, masked)


def save_model(
    run_dir: Path, model_cfg: DictConfig, spec: FeatureSpec, state: dict[str, torch.Tensor]
) -> Path:
    """Weights with the feature spec and model config: all that `load_model` needs."""
    payload = {
        "format": MODEL_FORMAT,
        "model": OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True),
        "features": spec.to_dict(),
        "state_dict": state,
    }
    path = run_dir / MODEL_FILE
    write_atomic(path, lambda tmp: torch.save(payload, tmp))
    return path


def without_retrieval_keys(model_cfg: dict) -> dict:
    """A model config without the retrieval task's settings, which two-tower model configs held
    before they moved to `retrieval` (the model never read them)."""
    return {k: v for k, v in model_cfg.items() if k not in RETRIEVAL_KEYS}


def load_model(run_dir: str | Path) -> tuple[nn.Module, FeatureSpec]:
    """An exported model on CPU in eval mode, built without any process group."""
    path = Path(run_dir) / MODEL_FILE
    if not path.exists():
        raise RecsysError(f"{path} does not exist: the run has no finished model")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != MODEL_FORMAT:
        raise RecsysError(f"{path} is not a recsys model file (format {payload.get('format')})")
    spec = FeatureSpec.from_dict(payload["features"])
    model_cfg = OmegaConf.create(without_retrieval_keys(payload["model"]))
    model = instantiate(model_cfg, _partial_=True, _convert_="all")(features=spec, device="cpu")
    model.load_state_dict(unfold_first_order(model, payload["state_dict"]))
    return model.eval(), spec


def flatten(node: Any, prefix: str = "") -> dict[str, int | float | str | bool]:
    """A nested config container as dotted keys to scalars (lists and null as text)."""
    out: dict[str, int | float | str | bool] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, int | float | str | bool):
        out[prefix] = node
    else:
        out[prefix] = "null" if node is None else str(node)
    return out


def flat_hparams(cfg: DictConfig) -> dict[str, int | float | str | bool]:
    """Scalar hyper-parameters for TensorBoard's HParams view."""
    out: dict[str, int | float | str | bool] = {}
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for section in ("model", "trainer"):
        out |= flatten(container[section], section)
    data = container["data"]
    for key in ("path", "batch_size", "label", "task"):
        out[f"data.{key}"] = str(data[key]) if not isinstance(data[key], int) else data[key]
    out["seed"] = container["seed"]
    return out
