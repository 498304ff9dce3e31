"""`python -m recsys.vocabulary [data=...] [data.vocabulary_min_count=N]`: count the ids of every
categorical column over the train split and write the vocabularies (recsys/data/vocabulary.py)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from recsys import config as schema
from recsys.data.vocabulary import build
from recsys.errors import exit_on_user_error

log = logging.getLogger("recsys")
schema.register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="vocabulary")
def main(cfg: DictConfig) -> None:
    """Entry point: counts over the configured data's train split; the model is not used."""
    with exit_on_user_error():
        index = build(schema.to_object(cfg).data)
    width = max(len(c) for c in index["columns"])
    for c, v in index["columns"].items():
        log.info("%-*s  %10d distinct  %10d kept  -> %d table rows", width, c, v["distinct"],
                 v["kept"], v["table_rows"])  # fmt: skip


if __name__ == "__main__":
    main()
