"""Faults injected for real: bad and vanishing files, bad labels, inputs out of range, full disks,
kills."""

from __future__ import annotations

import math
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from recsys import checkpoint, export, predict
from recsys.config import BadFilePolicy, LabelKind, SplitConfig
from recsys.data import vocabulary
from recsys.data.batches import DataQuality
from recsys.data.reader import open_split
from recsys.data.sources import BadFile, filesystem, readable
from recsys.errors import DataError
from recsys.exported import load_exported
from recsys.train import run
from tests.conftest import ROOT, compose_cfg, metrics_of
from tests.test_data import config, numbered, rows_of, write

SKIP = {"bad_files": BadFilePolicy.skip}


def truncate(path: Path) -> None:
    """Half of the file, as an interrupted copy leaves it: no footer."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def wrong_magic(path: Path) -> None:
    path.write_bytes(b"not a parquet file at all")


def bad_page(path: Path, row_group: int = -1) -> None:
    """Garbage over the first page header of a row group's first column; the footer stays."""
    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(row_group % meta.num_row_groups).column(0)
    at = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[at : at + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, wrong_magic], ids=["truncated", "wrong-magic"])
def test_a_bad_file_fails_in_one_line_naming_file_split_and_fix_or_is_skipped(tmp_path, damage):
    xs = numbered(tmp_path, [7, 13, 5])
    damage(tmp_path / "train" / "part-1.parquet")
    with pytest.raises(BadFile) as raised:
        open_split(config(tmp_path), "train", DataQuality(), train=True)
    line = str(raised.value)
    assert "\n" not in line and "part-1.parquet" in line and "split train" in line
    assert "replace or remove the file, or set data.bad_files=skip" in line
    quality = DataQuality()
    reader = open_split(config(tmp_path, **SKIP), "train", quality, train=True)
    assert rows_of(reader) == xs[:7] + xs[20:]
    assert list(quality.to_dict()["skipped_files"]) == [str(tmp_path / "train/part-1.parquet")]
    with pytest.raises(BadFile, match=r"1 files of .* cannot be read, more than data.max_bad_"):
        open_split(config(tmp_path, max_bad_files=0, **SKIP), "train", DataQuality(), True)


def test_a_file_gone_after_listing_is_named_as_such(tmp_path):
    numbered(tmp_path, [7, 13])
    data = config(tmp_path)
    fs, _ = filesystem(data.path, data.s3)
    files = [str(tmp_path / "train/part-0.parquet"), str(tmp_path / "train/gone.parquet")]
    with pytest.raises(BadFile, match=r"gone.parquet of here: it was removed after the split"):
        readable(fs, files, data, "here", DataQuality())
    quality = DataQuality()
    assert readable(fs, files, config(tmp_path, **SKIP), "here", quality) == files[:1]
    assert list(quality.skipped_files) == files[1:]


PERMISSION = """
import sys
from recsys.data import vocabulary
from recsys.data.batches import DataQuality
from recsys.data.reader import open_split
from recsys.errors import exit_on_user_error
from tests.test_data import config
with exit_on_user_error():
    open_split(config(sys.argv[1]), "train", DataQuality(), train=True)
"""


def test_a_file_without_read_permission_fails_in_one_line(tmp_path):
    numbered(tmp_path, [7, 13])
    (tmp_path / "train/part-1.parquet").chmod(0)
    command = [sys.executable, "-c", PERMISSION, str(tmp_path)]
    if os.getuid() == 0:  # root reads anything: drop the capabilities that let it
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "part-1.parquet of" in out.stderr and "permission denied" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("kind", [LabelKind.binary, LabelKind.regression])
def test_nan_and_inf_labels_are_refused_or_left_out_and_counted(tmp_path, kind):
    numbered(tmp_path, [7, 13])
    y = np.zeros(6)
    y[[1, 2, 4]] = [np.nan, 1e30, np.inf]  # 1e30: its square overflows float32
    t = pa.table({"y": y, "x": np.arange(100.0, 106.0), "a": np.zeros(6, np.int64),
                  "tags": pa.array([[1]] * 6)})  # fmt: skip
    pq.write_table(t, tmp_path / "train/a.parquet")  # first: the dataset's label type is its
    with pytest.raises(DataError, match=r"label column 'y' in .*a.parquet.* has value (null|inf)"):
        list(open_split(config(tmp_path, task=kind), "train", DataQuality(), train=True))
    quality = DataQuality()
    reader = open_split(config(tmp_path, task=kind, **SKIP), "train", quality, train=True)
    assert rows_of(reader)[:3] == [100.0, 103.0, 105.0]
    assert len(reader) == 6 and quality.to_dict()["skipped_bad_labels"] == {"y": 3}


QUICK = ["data.validation=null", "data.test=null", "trainer.progress_bar=false",
         "trainer.log_every_steps=1", "trainer.checkpoint.every_steps=7"]  # fmt: skip


def train(small: Path, run_dir: Path, *extra: str, file_limit: int | None = None):
    """recsys.train on `small` in a fresh process; file_limit: RLIMIT_FSIZE in bytes."""
    limit = None
    if file_limit is not None:

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    out = subprocess.run(
        [sys.executable, "-m", "recsys.train", f"data.path={small}", f"hydra.run.dir={run_dir}",
         *QUICK, *extra],
        cwd=ROOT, env={**os.environ, "HYDRA_FULL_ERROR": "0"}, capture_output=True, text=True,
        timeout=600, preexec_fn=limit,
    )  # fmt: skip
    return out, out.stdout + out.stderr


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error:" in line]


@pytest.mark.slow
def test_a_page_gone_bad_mid_epoch_ends_in_one_line_and_the_checkpoint_stays(small_data, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(small_data, small)
    bad = small / "train" / "part-00000.parquet"
    bad_page(bad)  # its last row group: the footer reads, the run starts and fails at ~step 16
    run_dir = tmp_path / "run"
    out, text = train(small, run_dir, "trainer.max_epochs=1")
    assert out.returncode == 2, text[-3000:]
    assert "Traceback" not in text
    [line] = error_lines(text)
    assert f"cannot read {bad} of {small} (split train: train)" in line
    assert "replace the file, or move it out of the split's paths" in line
    assert (
        f"is intact: once the data is fixed, run the same command with hydra.run.dir={run_dir}"
        in line
    )
    saved = checkpoint.candidates(run_dir / "checkpoints", "auto")
    assert saved and str(saved[0]) in line and not list((run_dir / "checkpoints").glob(".*"))


@pytest.mark.slow
def test_a_full_disk_keeps_the_last_complete_checkpoint_and_model(small_data, tmp_path):
    run_dir = tmp_path / "run"
    out, text = train(small_data, run_dir, "trainer.max_steps=7")
    assert out.returncode == 0, text[-3000:]
    model = (run_dir / "model.pt").read_bytes()
    # the checkpoint at step 14 is larger than the file size limit
    out, text = train(small_data, run_dir, "trainer.max_steps=14", file_limit=1 << 20)
    assert out.returncode == 2 and "Traceback" not in text, text[-3000:]
    [line] = error_lines(text)
    assert "writing checkpoint step 14 to" in line and "the file size limit" in line
    assert "the previous checkpoint step-000000007 is kept, the partial one removed" in line
    ckpts = run_dir / "checkpoints"
    assert [p.name for p in checkpoint.candidates(ckpts, "auto")][0] == "step-000000007"
    assert not list(ckpts.glob(".*"))
    # resumed from its finished checkpoint, the run rewrites its outputs: model.pt cannot be
    out, text = train(small_data, run_dir, "trainer.max_steps=7", file_limit=1 << 20)
    assert out.returncode == 2 and "Traceback" not in text, text[-3000:]
    [line] = error_lines(text)
    assert f"writing model.pt to {run_dir} failed: the file size limit" in line
    assert "the earlier one is kept, the partial one removed" in line
    assert (run_dir / "model.pt").read_bytes() == model and not list(run_dir.glob(".model.pt*"))


def ctr_rows(n: int, seed: int = 0) -> dict:
    """Columns of small click rows: label y, dense x (float) and n (int), ids a and tags lists."""
    r = np.random.default_rng(seed)
    return {"y": r.integers(0, 2, n).astype(np.int8), "x": r.normal(size=n),
            "n": r.integers(0, 1000, n), "a": r.integers(0, 10, n),
            "tags": [list(r.integers(0, 100, 3)) for _ in range(n)]}  # fmt: skip


TINY = ["model=fm", "data.label=y", "data.categorical=[a:10,tags:100]", "data.batch_size=16"]


def test_dense_values_out_of_range_and_an_overlong_list_are_clipped_cut_and_counted(tmp_path):
    rows = ctr_rows(64)
    rows["x"][[3, 7, 9, 11]] = [1e30, -1e30, 1e300, np.inf]  # 1e300 is inf in float32
    rows["n"][[2, 5]] = [30_000_000, 2**62]  # integers past float32's exact 2^24
    rows["tags"][5] = list(range(100_000))  # far longer than any other list
    write(tmp_path / "data/train", pa.table(rows))
    run_dir = tmp_path / "run"
    overrides = [f"data.path={tmp_path / 'data'}", *QUICK, *TINY, "data.dense=[x,n]"]
    run(compose_cfg(*overrides, "data.max_list_length=1000"), run_dir)  # in process: quicker
    quality = metrics_of(run_dir)["data_quality"]["train"]
    assert quality["dense_values_clipped"] == {"x": 4, "n": 2}
    assert quality["lists_truncated"] == {"tags": 1}
    assert all(math.isfinite(loss) for _, loss in metrics_of(run_dir)["train"]["losses"])
    data = config(tmp_path / "data", dense=["x", "n"], batch_size=64, max_list_length=1000)
    batch = next(iter(open_split(data, "train", DataQuality(), train=True)))
    assert batch.dense_features[[3, 7, 9, 11], 0].tolist() == [1e6, -1e6, 1e6, 1e6]
    assert batch.dense_features[[2, 5], 1].tolist() == [1e6, 1e6]
    tags = batch.sparse_features["tags"]
    assert tags.lengths()[4:7].tolist() == [3, 1000, 3]
    assert tags.values()[15:1015].tolist() == [i % 100 for i in range(1000)]  # its first ids
    # an export applies the same limits: it scores the rows as recsys.predict does
    export.run(compose_cfg(f"run={run_dir}", f"output={tmp_path / 'export'}", config_name="export"))
    predict.run(compose_cfg(f"run={run_dir}", f"output={tmp_path / 'scores'}", "split=train",
                            config_name="predict"))  # fmt: skip
    expected = ds.dataset(tmp_path / "scores").to_table()["score"].to_numpy()
    got = load_exported(tmp_path / "export")(pa.table(rows))["score"]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_rows_a_filter_empties_are_left_out_and_an_emptied_split_stops_in_one_line(tmp_path):
    xs = numbered(tmp_path, [7, 13, 5])  # row groups of 5 rows
    # part-0's second row group and all of part-1 have no row left
    reader = open_split(config(tmp_path, filter="x < 5 or x >= 20"), "train", DataQuality(), True)
    assert [len(b.labels) for b in reader] == [4, 4, 2] and rows_of(reader) == xs[:5] + xs[20:]
    # predict reads batches of 2: of part-2 (x 20..24), [20, 21] has no row left
    kept = "data.filter='x < 5 or x >= 22'"
    run_dir, out = tmp_path / "run", tmp_path / "scores"
    run(compose_cfg(f"data.path={tmp_path}", *QUICK, *TINY, "data.dense=[x]", kept), run_dir)
    predict.run(compose_cfg(f"run={run_dir}", f"output={out}", "split=train", "batch_size=2",
                            config_name="predict"))  # fmt: skip
    assert ds.dataset(out).count_rows() == 8
    with pytest.raises(DataError, match=r"leave no rows in .*data.filter='x > 1000'; loosen"):
        vocabulary.build(config(tmp_path, filter="x > 1000"))  # writes no empty vocabulary
    out, text = train(tmp_path, tmp_path / "emptied", *TINY, "data.dense=[x]",
                      "data.train.filter='x > 1000'")  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in text, text[-3000:]
    [line] = error_lines(text)
    assert f"the filters leave no rows in {tmp_path} (split train: train): " in line
    assert "data.train.filter='x > 1000'; loosen the filter" in line


@pytest.mark.parametrize(
    "split,over,ranks,message",
    [
        ("validation", {"validation": SplitConfig(["train"], "x > 1000")}, 1,
         r"leave no rows in \S+ \(split validation: train\): data.validation.filter='x > 1000'"),
        ("train", {"filter": "x < 3", "drop_remainder": True}, 1,
         r"makes no train step: 3 rows after data.filter='x < 3', fewer than one batch of "
         r"data.batch_size=4, and data.drop_remainder=true drops a short batch: lower data.batch_"
         r"size, set data.drop_remainder=false or loosen the filter$"),
        ("train", {"filter": "x < 5"}, 2,  # one row group left: rank 1 gets none
         r"makes no train step: 0 rows on rank 1 of 2 after data.filter='x < 5', fewer than one "
         r"batch .* on 2 ranks a short batch is dropped .* use fewer ranks"),
    ],
    ids=["validation-emptied", "shorter-than-a-batch", "a-rank-without-rows"],
)  # fmt: skip
def test_a_split_or_a_rank_a_filter_leaves_without_a_batch_fails_in_one_line(
    tmp_path, split, over, ranks, message
):
    numbered(tmp_path, [7, 13])
    for rank in range(ranks):  # every rank finds the same: none starts a step the others miss
        with pytest.raises(DataError, match=message):
            open_split(config(tmp_path, **over), split, DataQuality(), split == "train",
                       rank=rank, world_size=ranks)  # fmt: skip


def test_a_split_without_rows_says_why_empty_files_or_every_label_left_out(tmp_path):
    write(tmp_path / "train", pa.table(ctr_rows(3)).slice(0, 0))
    with pytest.raises(DataError, match=r"\(split train: train\) has no rows: its files are empty"):
        open_split(config(tmp_path), "train", DataQuality(), train=True)
    rows = ctr_rows(3) | {"y": [np.nan, np.inf, None]}
    write(tmp_path / "train", pa.table(rows))
    with pytest.raises(
        DataError,
        match=r"every row of .* has a null, NaN, inf or beyond \+-1e\+15 label y \(3 rows",
    ):
        open_split(config(tmp_path, **SKIP), "train", DataQuality(), train=True)
