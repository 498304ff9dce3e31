"""Files written whole or not at all (a temporary name, then a rename), and the text tables runs
print."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from recsys.errors import is_write_failure, write_failed


def write_atomic(path: Path, write: Any) -> None:
    """Write through `write(tmp_path)` to a temporary name beside path, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and is_write_failure(e):
            kept = "the earlier one is kept" if path.exists() else "nothing was written"
            raise write_failed(path.name, path.parent, e, kept) from None
        raise


def write_dir_atomic(path: Path, fill: Any) -> Any:
    """Fill a temporary directory beside path through `fill(tmp_dir)`, then rename it into place.

    The rename fails (OSError) if path exists and is not empty; returns what fill returned.
    """
    tmp = path.parent / f".{path.name}.{os.urandom(4).hex()}.tmp"
    tmp.mkdir(parents=True)  # unlike mkdtemp's 0700, the umask's permissions
    try:
        result = fill(tmp)
        os.rename(tmp, path)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def summary_table(rows: list[tuple[str, str]]) -> str:
    """A two-column text table."""
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A left-aligned text table with a rule under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
