"""The reader: files -> Arrow -> Batch, its checks and its repairs."""

import copy

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.config import DataConfig, FileFormat, LabelKind, OovPolicy, SplitConfig
from recsys.data.batches import BatchConverter, DataQuality, hash_strings
from recsys.data.features import FeatureSpec
from recsys.data.reader import open_split, prefetched
from recsys.data.sources import list_files, parse_filter
from recsys.errors import ConfigError, DataError
from tests.conftest import cli

SPEC = FeatureSpec("y", LabelKind.binary, ("x",), (("a", 10), ("tags", 100)))


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
        "categorical_nulls": {"a": 1, "tags": 2},  # a null, and tags' empty and null lists
        "out_of_range_ids": {"a": 1},
        "dense_values_clipped": {},
        "lists_truncated": {},
    }


def test_empty_and_null_lists_are_counted_with_a_missing_id_too():
    q = DataQuality()
    b = BatchConverter(SPEC, -1.0, OovPolicy.mod, q, missing_id=0)(table(), "mem")
    assert b.sparse_features["tags"].lengths().tolist() == [2, 1, 1, 1, 3]
    assert q.categorical_nulls == {"a": 1, "tags": 2}


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


def config(root, **over) -> DataConfig:
    base = dict(path=str(root), label="y", dense=["x"], categorical=["a:10", "tags:100"],
                validation=None, test=None, batch_size=4)  # fmt: skip
    return DataConfig(**(base | over))


def rows_of(reader) -> list:
    return [float(v) for b in reader for v in b.dense_features[:, 0]]


def test_bad_labels_and_ids_are_caught_from_footers_before_any_batch(tmp_path):
    write(tmp_path / "train", table(y=pa.array([0, 1, 3, 1, 0])))
    with pytest.raises(DataError, match=r"label column 'y' in .*part-0.parquet has value 3"):
        open_split(config(tmp_path), "train", DataQuality(), train=True)
    write(tmp_path / "ids", table())
    data = config(tmp_path, train=SplitConfig(["ids"]), oov=OovPolicy.error)
    with pytest.raises(DataError, match=r"'a' in .*part-0.parquet has id 12 outside its table"):
        open_split(data, "train", DataQuality(), train=True)


def test_no_data_files(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"no parquet files at .*split train: train"):
        open_split(config(tmp_path), "train", DataQuality(), train=True)


def test_missing_column_names_column_file_and_key(tmp_path):
    write(tmp_path / "train", table().drop_columns(["a"]))
    with pytest.raises(
        DataError, match=r"column 'a' \(data.categorical\) is not in .*part-0.parquet"
    ):
        open_split(config(tmp_path), "train", DataQuality(), train=True)


def test_wrong_column_types_are_refused(tmp_path):
    write(tmp_path / "f", table(a=pa.array([0.5] * 5)))
    with pytest.raises(DataError, match=r"'a' \(data.categorical\) .* type double"):
        open_split(config(tmp_path, train=SplitConfig(["f"])), "train", DataQuality(), True)
    write(tmp_path / "s", table(x=pa.array(["u"] * 5)))
    with pytest.raises(DataError, match=r"'x' \(data.dense\) .* type string"):
        open_split(config(tmp_path, train=SplitConfig(["s"])), "train", DataQuality(), True)


def test_a_list_where_one_number_is_configured_is_refused():
    t = table(x=pa.array([[1.0], [], None, [2.0, 3.0], [4.0]]))
    with pytest.raises(DataError, match=r"'x' \(data.dense\) in mem holds lists of up to 2"):
        convert(t)


def test_recis_layout_single_value_lists_read_as_numbers():
    q = DataQuality()
    t = table(
        x=pa.array([[1.5], [], None, [2.0], [4.0]]), y=pa.array([[0.0], [1.0], [0.0], [1.0], [1.0]])
    )
    b = convert(t, quality=q)
    assert b.dense_features[:, 0].tolist() == [1.5, -1.0, -1.0, 2.0, 4.0]
    assert b.labels.tolist() == [0, 1, 0, 1, 1]
    assert q.dense_nulls["x"] == 2


def test_string_ids_hash_stably_with_fnv1a():
    # reference values of 64-bit FNV-1a
    h = hash_strings(pa.array(["", "a", "foobar"]))
    assert h.tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]
    assert hash_strings(pa.array(["x", "a", "foobar"]).slice(1)).tolist() == h[1:].tolist()
    t = table(a=pa.array(["u1", None, "u3", "u1", ""]))
    v = convert(t).sparse_features["a"].values().tolist()
    assert v[0] == v[2] and all(0 <= x < 10 for x in v)
    assert v == (hash_strings(pa.array(["u1", "u3", "u1", ""])) % 10).tolist()


def test_missing_id_fills_empty_and_null_bags():
    b = BatchConverter(SPEC, 0.0, OovPolicy.mod, DataQuality(), missing_id=0)(table(), "mem")
    assert b.sparse_features["a"].lengths().tolist() == [1, 1, 1, 1, 1]
    assert b.sparse_features["a"].values().tolist() == [3, 4, 0, 2, 0]
    assert b.sparse_features["tags"].lengths().tolist() == [2, 1, 1, 1, 3]
    assert b.sparse_features["tags"].values().tolist() == [1, 2, 0, 0, 7, 5, 6, 99]


def numbered(tmp_path, sizes, sub="train"):
    """Files of consecutive x values, so rows can be told apart; returns all x values."""
    xs, start = [], 0
    for i, n in enumerate(sizes):
        x = np.arange(start, start + n, dtype=float)
        start += n
        xs += x.tolist()
        t = pa.table({"y": np.zeros(n, np.int8), "x": x, "a": np.zeros(n, np.int64),
                      "tags": pa.array([[1]] * n)})  # fmt: skip
        pq.write_table(t, tmp_path / sub / f"part-{i}.parquet", row_group_size=5) if (
            tmp_path / sub
        ).mkdir(parents=True, exist_ok=True) is None else None
    return xs


def test_batches_are_exact_across_files_and_keep_row_order(tmp_path):
    xs = numbered(tmp_path, [7, 13, 1, 20])
    reader = open_split(config(tmp_path, batch_size=8), "train", DataQuality(), train=True)
    batches = list(reader)
    assert [len(b.labels) for b in batches] == [8, 8, 8, 8, 8, 1] and len(reader) == 6
    assert rows_of(batches) == xs


def test_ranks_and_workers_read_disjoint_shares_with_equal_batch_counts(tmp_path):
    xs = numbered(tmp_path, [23, 17, 9, 31, 12])  # row groups of 5 rows are the pieces
    readers = [
        open_split(
            config(tmp_path, read_threads=2, batch_size=4),
            "train",
            DataQuality(),
            train=True,
            rank=r,
            world_size=3,
        )  # fmt: skip
        for r in range(3)
    ]
    assert len({len(r) for r in readers}) == 1
    seen = [rows_of(r) for r in readers]
    assert all(len(s) == 4 * len(readers[0]) for s in seen)
    flat = [x for s in seen for x in s]
    assert len(flat) == len(set(flat)) and set(flat) <= set(xs)
    rows = [sum(p.rows for w in r.shares[r.rank] for p in w) for r in readers]
    assert sum(rows) == len(xs)  # every row is in one rank's share
    assert max(rows) - min(rows) <= 5  # dealt by rows: the ranks differ by at most a piece
    # only remainders dropped: each worker's last partial batch (< 4 rows), and what the longer
    # ranks hold beyond the shortest's rows
    assert len(xs) - len(flat) <= 3 * 2 * 3 + sum(n - min(rows) for n in rows)


def test_shuffle_is_deterministic_per_seed_and_differs_per_epoch(tmp_path):
    xs = numbered(tmp_path, [40, 40, 40])
    data = config(tmp_path, shuffle_buffer=32, batch_size=8)
    a = open_split(data, "train", DataQuality(), train=True, seed=1)
    b = open_split(data, "train", DataQuality(), train=True, seed=1)
    first, again = rows_of(a), rows_of(b)
    assert first == again and sorted(first) == xs and first != xs
    assert rows_of(a.iterate(1)) != first  # epoch 2 of the same reader
    assert rows_of(open_split(data, "train", DataQuality(), train=True, seed=2)) != first


def test_paths_globs_hidden_files_and_partition_filters(tmp_path):
    for day in ["2026-11-01", "2026-11-02", "2026-11-03"]:
        write(tmp_path / f"day={day}", table(), "part-0.parquet")
    write(tmp_path / "day=2026-11-02", table(), "_tmp.parquet")  # hidden: skipped
    (tmp_path / "day=2026-11-02" / "_SUCCESS").write_text("")
    from pyarrow import fs

    local = fs.LocalFileSystem()
    assert len(list_files(local, str(tmp_path), "day=*", FileFormat.parquet)) == 3
    assert len(list_files(local, str(tmp_path), ".", FileFormat.parquet)) == 3
    assert list_files(local, str(tmp_path), "day=2026-11-0[12]/*.parquet", FileFormat.parquet) == [
        f"{tmp_path}/day=2026-11-01/part-0.parquet",
        f"{tmp_path}/day=2026-11-02/part-0.parquet",
    ]
    data = config(tmp_path, train=SplitConfig(["."], "day >= '2026-11-02'"), batch_size=100)
    assert open_split(data, "train", DataQuality(), train=True).num_rows == 10
    data = config(tmp_path, train=SplitConfig(["day=2026-11-01", "day=2026-11-03"]), batch_size=100)
    assert open_split(data, "train", DataQuality(), train=True).num_rows == 10
    data = config(tmp_path, train=SplitConfig(["."]), filter="day == '2026-11-03' and x > 0.6")
    assert rows_of(open_split(data, "train", DataQuality(), train=True)) == [2.0, 1.0]


def test_bad_filters_are_refused_before_reading(tmp_path):
    write(tmp_path / "train", table())
    with pytest.raises(ConfigError, match=r"data.filter='x >> 1': cannot use"):
        parse_filter("x >> 1", "data.filter")
    with pytest.raises(ConfigError, match=r"filter names column\(s\) \['dayz'\]"):
        open_split(config(tmp_path, filter="dayz == 1"), "train", DataQuality(), train=True)
    expr, cols = parse_filter("'a' <= day < 'c' and not x in [1, 2]", "k")
    assert cols == {"day", "x"}


def test_orc_and_parquet_give_the_same_batches(tmp_path):
    import pyarrow.orc as orc

    t = table()
    write(tmp_path / "p", t)
    (tmp_path / "o").mkdir()
    orc.write_table(t, tmp_path / "o" / "part-0.orc")
    pb = list(open_split(config(tmp_path, train=SplitConfig(["p"])), "train", DataQuality(), True))
    ob = list(open_split(config(tmp_path, train=SplitConfig(["o"]), format=FileFormat.orc), "train",
                         DataQuality(), True))  # fmt: skip
    assert len(pb) == len(ob) == 2
    for x, y in zip(pb, ob, strict=True):
        assert x.sparse_features.values().tolist() == y.sparse_features.values().tolist()
        assert x.dense_features.tolist() == y.dense_features.tolist()


def test_prefetch_hands_errors_to_the_consumer():
    def items():
        yield 1
        raise DataError("bad row")

    it = prefetched(items(), 2)
    assert next(it) == 1
    with pytest.raises(DataError, match="bad row"):
        next(it)


def test_vocabulary_sizes_tables_and_maps_ids_by_frequency(tmp_path):
    from recsys.data import vocabulary

    n = 12
    t = pa.table({
        "y": np.zeros(n, np.int8), "x": np.zeros(n),
        "a": pa.array([7, 7, 7, 5, 5, 900, 7, 5, 3, 7, None, 5]),
        "tags": pa.array([["red"], ["blue", "red"], [], None, ["red"], ["green"]] * 2),
    })  # fmt: skip
    write(tmp_path / "train", t)
    data = config(tmp_path, categorical=["a", "tags"], vocabulary=True, vocabulary_min_count=2)
    with pytest.raises(DataError, match=r"has no vocabulary .*python -m recsys.vocabulary"):
        open_split(data, "train", DataQuality(), train=True)
    index = vocabulary.build(data)
    assert index["columns"]["a"] == {"distinct": 4, "kept": 2, "table_rows": 3}
    assert index["columns"]["tags"] == {"distinct": 3, "kept": 3, "table_rows": 4}
    reader = open_split(data, "train", DataQuality(), train=True)
    assert dict(reader.converter.spec.categorical) == {"a": 3, "tags": 4}
    b = BatchConverter(reader.converter.spec, 0.0, OovPolicy.mod, DataQuality(),
                       vocab=reader.converter.vocab)(t, "mem")  # fmt: skip
    # a: 7 (5 times) -> row 1, 5 (4 times) -> row 2; 900 and 3 (once each, < min_count) -> 0
    assert b.sparse_features["a"].values().tolist() == [1, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2]
    # tags: red (6) -> 1, blue (2) and green (2): ties broken by value, blue -> 2, green -> 3
    assert b.sparse_features["tags"].values().tolist()[:5] == [1, 2, 1, 1, 3]


def test_the_vocabulary_pass_leaves_no_run_dir_and_a_demo_set_as_generated(tmp_path):
    demo = tmp_path / "cache" / "demo" / "tiny"  # an embedded demo set, as the cache holds it
    numbered(demo, [30])
    args = [f"data.path={demo}", "data.label=y", "data.dense=[x]", "data.categorical=[a,tags]",
            "data.vocabulary=true", "data.validation=null", "data.test=null"]  # fmt: skip
    (tmp_path / "work").mkdir()
    env = {"RECSYS_CACHE": str(tmp_path / "cache")}
    out = cli(*args, module="vocabulary", cwd=tmp_path / "work", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vocabularies of" in out.stdout + out.stderr
    assert not list((tmp_path / "work").iterdir())  # no experiments/<date>/..., no log file
    assert sorted(p.name for p in demo.iterdir()) == ["train"]
    assert (tmp_path / "cache" / "vocab" / "tiny" / "vocab.json").exists()


def test_a_saved_position_resumes_the_epoch_with_the_same_batches_and_counts(tmp_path):
    numbered(tmp_path, [40, 40, 40, 24])
    x = pa.array([None if i % 7 == 0 else float(i) for i in range(40)])  # repairs to count
    t = pa.table({"y": np.zeros(40, np.int8), "x": x, "a": np.zeros(40, np.int64),
                  "tags": pa.array([[1]] * 40)})  # fmt: skip
    pq.write_table(t, tmp_path / "train" / "part-9.parquet", row_group_size=5)
    data = config(tmp_path, shuffle_buffer=16, batch_size=4, read_threads=2)

    def reader():
        return open_split(data, "train", DataQuality(), train=True, seed=3)

    full = reader()
    everything = [b.dense_features[:, 0].tolist() for b in full.iterate(1)]
    for stop in (1, 5, len(everything) - 1):
        first = reader()
        batches = first.iterate(1)
        head = [next(batches).dense_features[:, 0].tolist() for _ in range(stop)]
        position = copy.deepcopy(first.position)
        batches.close()
        assert position.batches == stop and len(position.workers) == 2
        assert all(w.pieces for w in position.workers[:stop])  # the pieces each was on
        second = reader()
        second.converter.quality.add(first.converter.quality)
        tail = [b.dense_features[:, 0].tolist() for b in second.iterate(1, position)]
        assert head + tail == everything
        assert second.converter.quality == full.converter.quality


def test_repairs_are_counted_in_the_rows_used(tmp_path):
    n = 40
    x = [None if i % 3 == 0 else 1.0 for i in range(n)]
    tags = [[] if i % 4 == 0 else [1] for i in range(n)]
    write(tmp_path / "train", pa.table({"y": np.zeros(n, np.int8), "x": x, "a": np.zeros(n, int),
                                        "tags": tags}))  # fmt: skip
    data = config(tmp_path, batch_size=4)  # the reader converts 8 batches at once, 4 ahead
    train = open_split(data, "train", DataQuality(), train=True)
    batches = iter(train)
    taken = [next(batches) for _ in range(3)]
    assert sum(b.labels.numel() for b in taken) == 12
    assert train.converter.quality.dense_nulls == {"x": 4}  # rows 0, 3, 6, 9
    assert train.converter.quality.categorical_nulls == {"tags": 3}  # rows 0, 4, 8
    batches.close()
    # an evaluation split counts one pass over it, however many times it is evaluated
    evaluated = open_split(data, "train", DataQuality(), train=False)
    for _ in range(2):
        assert sum(b.labels.numel() for b in evaluated) == n
        assert evaluated.converter.quality.dense_nulls == {"x": 14}
        assert evaluated.converter.quality.categorical_nulls == {"tags": 10}


def test_pieces_are_dealt_to_ranks_by_rows_so_few_are_dropped(tmp_path):
    numbered(tmp_path, [20, 5, 20, 5, 20, 5, 20, 5])  # row groups of 5: all pieces equal
    data = config(tmp_path, batch_size=5)
    pieces = [open_split(data, "train", DataQuality(), True, rank=r, world_size=2) for r in (0, 1)]
    assert [r.num_rows for r in pieces] == [50, 50]
    assert len(pieces[0]) == len(pieces[1]) == 10


@pytest.mark.parametrize(
    "where",
    [
        "day < '2026-11-03'",  # partition keys only: whole row groups pass
        "x >= 3 and x < 41",  # columns only
        "day < '2026-11-03' and x > 7",  # both
        "day < '2026-11-02' or x > 50",  # true by partition in some files, by rows in others
    ],
)
def test_rows_counted_under_filters_match_an_independent_count_and_the_rows_read(tmp_path, where):
    xs = []
    for d in range(4):  # 4 days x 20 rows in row groups of 5 rows (the pieces)
        x = np.arange(d * 20, (d + 1) * 20, dtype=float)
        xs.append(x)
        t = pa.table({"y": np.zeros(20, np.int8), "x": x, "a": np.zeros(20, np.int64),
                      "tags": pa.array([[1]] * 20)})  # fmt: skip
        (tmp_path / f"day=2026-11-0{d + 1}").mkdir()
        pq.write_table(t, tmp_path / f"day=2026-11-0{d + 1}" / "p.parquet", row_group_size=5)
    expr, _ = parse_filter(where, "data.filter")
    import pyarrow.dataset as ds

    # materialised, so that no metadata shortcut of Arrow's count is involved
    passing = ds.dataset(tmp_path, partitioning="hive").to_table(filter=expr)["x"].to_pylist()
    data = config(tmp_path, train=SplitConfig(["."], where), batch_size=3)
    one = open_split(data, "train", DataQuality(), train=True)
    assert one.num_rows == len(passing)
    assert sorted(rows_of(one)) == sorted(passing)
    two = [open_split(data, "train", DataQuality(), True, rank=r, world_size=2) for r in (0, 1)]
    assert sum(r.num_rows for r in two) == len(passing)
    assert len(two[0]) == len(two[1]) == min(r.num_rows // 3 for r in two)
    read = [rows_of(r) for r in two]
    assert all(len(rows) == 3 * len(two[0]) for rows in read)
    flat = read[0] + read[1]
    assert len(set(flat)) == len(flat) and set(flat) <= set(passing)
