"""The reader: files -> Arrow -> Batch, its checks and its repairs."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.config import DataConfig, OovPolicy, Task
from recsys.data import (
    BatchConverter,
    DataQuality,
    ParquetSplit,
    check_files,
    find_files,
    open_split,
    prefetched,
)
from recsys.errors import DataError
from recsys.features import FeatureSpec

SPEC = FeatureSpec("y", Task.binary, ("x",), (("a", 10), ("tags", 100)))


def table(n=5, **over):
    cols = {
        "y": pa.array([0, 1, 0, 1, 1][:n], pa.int8()),
        "x": pa.array([0.5, None, 2.0, float("nan"), 1.0][:n], pa.float64()),
        "a": pa.array([3, 4, None, 12, 0][:n], pa.int64()),
        "tags": pa.array([[1, 2], [], None, [7], [5, 6, 99]][:n], pa.list_(pa.int64())),
    }
    cols.update(over)
    return pa.table(cols)


def write(dirpath, t, name="part-0.parquet"):
    dirpath.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, dirpath / name)
    return dirpath


def convert(t, oov=OovPolicy.mod, quality=None):
    return BatchConverter(SPEC, -1.0, oov, quality or DataQuality())(t, "mem")


def test_list_and_scalar_columns_become_kjt_values_and_lengths():
    q = DataQuality()
    b = convert(table(), quality=q)
    kjt = b.sparse_features
    assert kjt.keys() == ["a", "tags"]
    # a: null -> empty bag; 12 is outside the 10-row table -> 12 mod 10 = 2
    assert kjt["a"].lengths().tolist() == [1, 1, 0, 1, 1]
    assert kjt["a"].values().tolist() == [3, 4, 2, 0]
    # tags: lists keep their length; an empty list and a null list are empty bags
    assert kjt["tags"].lengths().tolist() == [2, 0, 0, 1, 3]
    assert kjt["tags"].values().tolist() == [1, 2, 7, 5, 6, 99]
    assert b.labels.tolist() == [0, 1, 0, 1, 1]
    assert b.dense_features[:, 0].tolist() == [0.5, -1.0, 2.0, -1.0, 1.0]
    assert q.to_dict() == {
        "dense_nulls_filled": {"x": 2},
        "categorical_nulls": {"a": 1, "tags": 1},
        "out_of_range_ids": {"a": 1},
    }


def test_sliced_list_columns_convert_from_their_own_offsets():
    b = convert(table().slice(3, 2))
    assert b.sparse_features["tags"].lengths().tolist() == [1, 3]
    assert b.sparse_features["tags"].values().tolist() == [7, 5, 6, 99]


def test_out_of_range_id_with_error_policy_names_column_and_fix():
    with pytest.raises(
        DataError, match=r"'a' in mem has id 12 outside its table of 10 rows.*data.oov=mod"
    ):
        convert(table(), oov=OovPolicy.error)


def test_non_binary_label_is_refused():
    with pytest.raises(
        DataError, match=r"label column 'y' in mem has value 3.0.*data.task=regression"
    ):
        convert(table(y=pa.array([0, 1, 3, 1, 0])))


def test_bad_labels_and_ids_are_caught_from_footers_before_any_batch(tmp_path):
    write(tmp_path / "train", table(y=pa.array([0, 1, 3, 1, 0])))
    data = DataConfig(path=str(tmp_path), label="y", dense=["x"], categorical=["a:10", "tags:100"])
    with pytest.raises(DataError, match=r"label column 'y' in .*part-0.parquet has value 3"):
        open_split(data, "train", DataQuality(), train=True)
    write(tmp_path / "ids", table())
    data.oov = OovPolicy.error
    with pytest.raises(DataError, match=r"'a' in .*part-0.parquet has id 12 outside its table"):
        open_split(data, "ids", DataQuality(), train=True)


def test_no_parquet_files(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"no Parquet files at .*train.*data.path"):
        find_files(str(tmp_path), "train")


def test_missing_column_names_column_file_and_key(tmp_path):
    write(tmp_path / "train", table().drop_columns(["a"]))
    files = find_files(str(tmp_path), "train")
    with pytest.raises(
        DataError, match=r"column 'a' \(data.categorical\) is not in .*part-0.parquet"
    ):
        check_files(files, SPEC, OovPolicy.mod)


def test_string_ids_and_list_dense_are_refused(tmp_path):
    write(tmp_path / "s", table(a=pa.array(["u1", "u2", "u3", "u4", "u5"])))
    with pytest.raises(DataError, match=r"'a' \(data.categorical\) .* type string"):
        check_files(find_files(str(tmp_path), "s"), SPEC, OovPolicy.mod)
    write(tmp_path / "l", table(x=pa.array([[1.0]] * 5)))
    with pytest.raises(DataError, match=r"'x' \(data.dense\) .* numeric scalar"):
        check_files(find_files(str(tmp_path), "l"), SPEC, OovPolicy.mod)


def test_batches_are_exact_across_files_and_keep_row_order(tmp_path):
    rng = np.random.default_rng(0)
    labels = []
    for i, n in enumerate([7, 13, 1, 20]):
        y = rng.integers(0, 2, n)
        labels.append(y)
        t = pa.table(
            {
                "y": y,
                "x": rng.random(n),
                "a": rng.integers(0, 10, n),
                "tags": pa.array([[int(v)] for v in rng.integers(0, 100, n)]),
            }
        )
        write(tmp_path / "train", t, f"part-{i}.parquet")
    split = ParquetSplit(
        find_files(str(tmp_path), "train"),
        BatchConverter(SPEC, 0.0, OovPolicy.mod, DataQuality()),
        batch_size=8,
    )
    batches = list(split)
    assert [len(b.labels) for b in batches] == [8, 8, 8, 8, 8, 1]
    assert len(split) == 6
    assert (
        np.concatenate([b.labels.numpy() for b in batches]).tolist()
        == np.concatenate(labels).tolist()
    )


def test_open_split_globs_and_max_batches(tmp_path):
    for i in range(3):
        write(tmp_path / f"day={i}", table(), "f.parquet")
    data = DataConfig(
        path=str(tmp_path), label="y", dense=["x"], categorical=["a:10", "tags:100"], batch_size=4
    )
    split = open_split(data, "day=*", DataQuality(), train=True, max_batches=2)
    assert split.num_rows == 15 and len(split) == 2 and len(list(split)) == 2


def test_prefetch_hands_errors_to_the_consumer():
    def items():
        yield 1
        raise DataError("bad row")

    it = prefetched(items(), 2)
    assert next(it) == 1
    with pytest.raises(DataError, match="bad row"):
        next(it)
