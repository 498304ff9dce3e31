"""`python -m recsys.serve run=<run dir or export dir> [port=8080] [host=127.0.0.1]`: HTTP scoring.

A FastAPI app under uvicorn, on the loopback address unless host= says otherwise:
- GET /health, GET /schema (the columns a row needs, their roles and types);
- ranking models: POST /score {"rows": [{column: value, ...}, ...]} -> score (and probability);
- two-tower: POST /encode/user, /encode/item -> embedding; POST /recommend {"rows": [user
  features...], "k": 10} -> each user's top-k corpus items and scores (cosine similarity).
A row missing a column, or a value of the wrong type, is answered 422 naming the column; more rows
than max_rows, or a body over max_body_bytes, 413.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from omegaconf import DictConfig
from pydantic import BaseModel, Field

from recsys import config as schema
from recsys import exported
from recsys.config import RunInputConfig, ServeConfig
from recsys.errors import ConfigError
from recsys.export import load_run
from recsys.exported import InputError, Scorer, TwoTowerExport, load_exported
from recsys.runs import run_or_exit
from recsys.topk import top_k

log = logging.getLogger("recsys")
schema.register()


class Rows(BaseModel):
    """A batch of rows, each a JSON object of raw column values (null: missing)."""

    rows: list[dict[str, Any]] = Field(min_length=1)


class UserRows(Rows):
    k: int | None = Field(default=None, ge=1)


def open_model(path: str | Path) -> Scorer | TwoTowerExport:
    """An export directory as it is; a run dir exported to a temporary directory first."""
    path = Path(path).expanduser()
    if (path / exported.META_FILE).exists():
        return load_exported(path)
    if not path.is_dir():
        raise ConfigError(f"run={path} does not exist: give a run dir or an export dir")
    return load_run(RunInputConfig(run=str(path)))[0]


def columns_of(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, list]:
    """Row objects as columns; a row without one of the columns is refused, naming it."""
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise InputError(
                f"rows[{i}] has no field '{missing[0]}'; each row needs: {', '.join(columns)} "
                "(null for a missing value)"
            )
    return {c: [row[c] for row in rows] for c in columns}


def create_app(model: Scorer | TwoTowerExport, max_rows: int, max_body_bytes: int, k: int):
    """The FastAPI app serving the model."""
    meta = model.meta
    app = FastAPI(title=f"recsys {meta['model']}", version=meta["format"])

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            message = f"the request body has {size} bytes, over max_body_bytes={max_body_bytes}"
            return JSONResponse({"detail": message}, status_code=413)
        return await call_next(request)

    def run(fn, rows: list[dict[str, Any]], columns: list[str]) -> dict:
        if len(rows) > max_rows:
            raise HTTPException(413, f"{len(rows)} rows, over max_rows={max_rows}: split them")
        try:
            return fn(columns_of(rows, columns))
        except InputError as e:
            raise HTTPException(422, str(e)) from None

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": meta["model"], "kind": meta["kind"]}

    if isinstance(model, Scorer):
        outputs = ["score", *(["probability"] if meta["task"] == "binary" else [])]

        @app.get("/schema")
        def schema_() -> dict:
            inputs = model.features.schema()
            return {"model": meta["model"], "task": meta["task"], "inputs": inputs,
                    "outputs": outputs, "max_rows": max_rows}  # fmt: skip

        @app.post("/score")
        def score(body: Rows) -> dict:
            out = run(model, body.rows, model.columns)
            return {name: out[name].tolist() for name in outputs}

        return app

    corpus = None if model.corpus_vectors is None else torch.from_numpy(model.corpus_vectors)

    @app.get("/schema")
    def tower_schema() -> dict:
        towers = {side: getattr(model, side).features.schema() for side in ("user", "item")}
        return {"model": meta["model"], "inputs": towers, "outputs": ["embedding"],
                "corpus_items": 0 if corpus is None else len(corpus),
                "max_rows": max_rows}  # fmt: skip

    for side in ("user", "item"):
        encoder = getattr(model, side)

        def encode(body: Rows, encoder=encoder) -> dict:
            return {"embedding": run(encoder, body.rows, encoder.columns)["embedding"].tolist()}

        app.post(f"/encode/{side}")(encode)

    @app.post("/recommend")
    def recommend(body: UserRows) -> dict:
        if corpus is None:
            raise HTTPException(404, "this export has no corpus: export it with corpus=true")
        users = run(model.user, body.rows, model.user.columns)["embedding"]
        scores, positions = top_k(torch.from_numpy(users), corpus, body.k or k)
        ids = model.corpus_ids[positions.numpy()]
        return {"items": ids.tolist(), "scores": scores.numpy().tolist()}

    return app


def run(cfg: DictConfig) -> None:
    """Load the model and serve it until interrupted."""
    import uvicorn

    typed: ServeConfig = schema.to_object(cfg)
    if typed.threads:
        torch.set_num_threads(typed.threads)
    model = open_model(typed.run)
    app = create_app(model, typed.max_rows, typed.max_body_bytes, typed.k)
    log.info("serving %s (%s) on http://%s:%d", typed.run, model.meta["model"], typed.host,
             typed.port)  # fmt: skip
    uvicorn.run(app, host=typed.host, port=typed.port, log_level="warning")


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    """Entry point; user errors end with one line naming the fix."""
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
