"""Structured config schemas: Hydra validates every composed config against these."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf

from recsys.errors import ConfigError


class LabelKind(Enum):
    """The kind of label (`data.task`): 0/1 clicks, or any number."""

    binary = "binary"
    regression = "regression"


class OovPolicy(Enum):
    """What to do with a categorical id outside [0, table size)."""

    mod = "mod"
    error = "error"


class BadFilePolicy(Enum):
    """What to do with a data file that cannot be read, or rows whose label is NaN or infinite."""

    fail = "fail"
    skip = "skip"  # leave them out, counted and named, up to data.max_bad_files files


class Pooling(Enum):
    sum = "sum"
    mean = "mean"


class CrossStructure(Enum):
    """How DCN-v2 joins its cross network and DNN."""

    stacked = "stacked"  # the DNN on top of the cross layers
    parallel = "parallel"  # both on x_0, one linear over their concatenated outputs


class SparseOptimizer(Enum):
    rowwise_adagrad = "rowwise_adagrad"
    adagrad = "adagrad"
    sgd = "sgd"
    adam = "adam"


class LrDecay(Enum):
    none = "none"
    linear = "linear"
    cosine = "cosine"


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} is out of range: it must be {bound}")


class FileFormat(Enum):
    parquet = "parquet"
    orc = "orc"


@dataclass
class SplitConfig:
    """The files (paths or globs relative to data.path) and rows (a filter) of one split."""

    paths: list[str] = field(default_factory=list)
    filter: str | None = None


@dataclass
class S3Config:
    """How to reach S3 or an S3-compatible store; null values fall back to the AWS chain."""

    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    max_attempts: int = 5
    outage_budget_s: float = 300.0  # how long reads wait for an endpoint down mid-run

    def __post_init__(self) -> None:
        _positive("data.s3.max_attempts", self.max_attempts)
        _positive("data.s3.outage_budget_s", self.outage_budget_s, allow_zero=True)


class MixStrategy(Enum):
    """Which source each step of a mixed epoch draws its batch from."""

    sequential = "sequential"  # each source in turn, whole (pre-train, then fine-tune)
    round_robin = "round_robin"  # one batch from each in turn
    weighted = "weighted"  # each batch from a source drawn with `weights`, seeded
    alternating = "alternating"  # `pattern` of source indices, each repeated `burst` times


@dataclass
class SourceConfig:
    """One train source of a mix: its files, filters and splits; null fields take data.*'s."""

    path: str = MISSING
    format: FileFormat | None = None
    hive_partitioning: bool | None = None
    filter: str | None = None
    train: SplitConfig = field(default_factory=lambda: SplitConfig(["train"]))
    validation: SplitConfig | None = field(default_factory=lambda: SplitConfig(["validation"]))
    test: SplitConfig | None = field(default_factory=lambda: SplitConfig(["test"]))
    weight: float = 1.0  # the loss of this source's batches is multiplied by it


@dataclass
class MixConfig:
    """How the sources of `data.sources` are mixed into one train epoch."""

    strategy: MixStrategy = MixStrategy.round_robin
    # steps per epoch: sum | shortest | longest (of the sources' batches) | a number of steps
    epoch: str = "sum"
    weights: list[float] | None = None  # weighted: one per source, in data.sources order
    pattern: list[int] | None = None  # alternating: source indices, e.g. [0, 0, 1]
    burst: int = 1  # alternating: batches in a row for each pattern entry
    validation: str = "micro"  # the aggregate validation metric: micro | macro | <source name>

    def __post_init__(self) -> None:
        _positive("data.mix.burst", self.burst)
        if self.epoch not in ("sum", "shortest", "longest") and not (
            str(self.epoch).isdigit() and int(self.epoch) > 0
        ):
            raise ConfigError(
                f"data.mix.epoch={self.epoch} is not sum, shortest, longest or a step count > 0"
            )
        weights = self.weights
        if weights is not None and (any(w < 0 for w in weights) or not any(weights)):
            raise ConfigError(
                f"data.mix.weights={list(weights)}: weights must be >= 0 and one at least > 0, "
                "e.g. [0.7,0.3]"
            )

    def check(self, sources: list[str]) -> None:
        """The settings that depend on the sources: one weight each, pattern indices, names."""
        n = len(sources)
        if self.strategy is MixStrategy.weighted and len(self.weights or []) != n:
            raise ConfigError(
                f"data.mix.strategy=weighted needs data.mix.weights with one weight per source "
                f"({n}: {', '.join(sources)}), e.g. [{','.join(['1'] * n)}]"
            )
        if self.strategy is MixStrategy.alternating:
            if not self.pattern:
                raise ConfigError(
                    "data.mix.strategy=alternating needs data.mix.pattern: source indices, "
                    "e.g. [0,0,1]"
                )
            past = [i for i in self.pattern if not 0 <= i < n]
            if past:
                raise ConfigError(
                    f"data.mix.pattern={list(self.pattern)}: index {past[0]} is past the "
                    f"{n} sources ({', '.join(sources)}); use 0..{n - 1}"
                )
        if self.validation not in ("micro", "macro", *sources):
            raise ConfigError(
                f"data.mix.validation={self.validation} is not micro, macro or a source "
                f"({', '.join(sources)})"
            )


def _source(name: str, given: Any) -> SourceConfig:
    """One entry of data.sources, typed and checked."""
    if isinstance(given, SourceConfig):
        return given
    known = [f.name for f in fields(SourceConfig)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(
            f"data.sources.{name}.{unknown[0]} is not a key of a source: use {', '.join(known)}"
        )
    if given.get("path") is None:
        raise ConfigError(
            f"data.sources.{name}.path is missing: give the source's directory or s3:// URI"
        )
    try:
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SourceConfig), given))
    except Exception as e:  # omegaconf's validation: a wrong type or enum value
        raise ConfigError(f"data.sources.{name}: {str(e).splitlines()[0]}") from None
    _positive(f"data.sources.{name}.weight", typed.weight, allow_zero=True)
    return typed


@dataclass
class DataConfig:
    """Where the data is and how its columns map to features."""

    path: str = MISSING
    format: FileFormat = FileFormat.parquet
    hive_partitioning: bool = True
    filter: str | None = None
    train: SplitConfig = field(default_factory=lambda: SplitConfig(["train"]))
    validation: SplitConfig | None = field(default_factory=lambda: SplitConfig(["validation"]))
    test: SplitConfig | None = field(default_factory=lambda: SplitConfig(["test"]))
    label: str = MISSING
    task: LabelKind = LabelKind.binary  # the label's kind
    dense: list[str] = field(default_factory=list)
    # "column:rows" entries: a categorical column and the rows of its embedding table
    categorical: list[str] = field(default_factory=list)
    dense_fill_value: float = 0.0
    dense_max_abs: float = 1.0e6  # dense values beyond +-this (inf too) are clipped to it
    max_list_length: int | None = 10_000  # longer categorical lists keep their first ids
    oov: OovPolicy = OovPolicy.mod
    missing_id: int | None = None
    # size tables by and map ids through the vocabularies `python -m recsys.vocabulary` wrote
    vocabulary: bool = False
    vocabulary_min_count: int = 1
    batch_size: int = 4096
    eval_batch_size: int = 16384
    read_threads: int = 1
    prefetch: int = 4
    shuffle_buffer: int = 0
    drop_remainder: bool = False
    bad_files: BadFilePolicy = BadFilePolicy.fail
    max_bad_files: int = 10
    s3: S3Config = field(default_factory=S3Config)
    # several train sources mixed into one run (empty: path and its splits, as one source)
    # (typed as Any so that `+data.sources.<name>.path=...` can add one; SourceConfig each)
    sources: dict[str, Any] = field(default_factory=dict)
    mix: MixConfig = field(default_factory=MixConfig)

    def __post_init__(self) -> None:
        self.sources = {name: _source(name, given) for name, given in self.sources.items()}
        if self.sources:
            self.mix.check(list(self.sources))
        _positive("data.batch_size", self.batch_size)
        _positive("data.eval_batch_size", self.eval_batch_size)
        _positive("data.read_threads", self.read_threads)
        _positive("data.prefetch", self.prefetch, allow_zero=True)
        _positive("data.shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        _positive("data.missing_id", self.missing_id, allow_zero=True)
        _positive("data.vocabulary_min_count", self.vocabulary_min_count)
        _positive("data.max_bad_files", self.max_bad_files, allow_zero=True)
        _positive("data.dense_max_abs", self.dense_max_abs)
        _positive("data.max_list_length", self.max_list_length)
        if abs(self.dense_fill_value) > self.dense_max_abs:
            raise ConfigError(
                f"data.dense_fill_value={self.dense_fill_value} is beyond data.dense_max_abs="
                f"{self.dense_max_abs}: use a fill value inside it, or raise data.dense_max_abs"
            )
        if not self.train.paths:
            raise ConfigError("data.train.paths is empty: name the train files, e.g. [train]")
        if not self.categorical:
            raise ConfigError(
                "data.categorical is empty: name at least one categorical column and its "
                "table size, e.g. data.categorical=[user_id:100000,item_id:5000]"
            )
        tables = self.tables
        columns = [self.label, *self.dense, *tables]
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise ConfigError(f"column(s) {twice} are configured twice; give each column one role")
        if self.missing_id is not None:
            small = [
                n for n, rows in tables.items() if rows is not None and rows <= self.missing_id
            ]
            if small:
                raise ConfigError(
                    f"data.missing_id={self.missing_id} is past the table of {small[0]}: "
                    "use an id every table has, e.g. 0"
                )

    def of_source(self, name: str) -> DataConfig:
        """This config with one source's location, format, filter and splits, for its readers."""
        src = self.sources[name]
        return dataclasses.replace(
            self, path=src.path, format=src.format or self.format, filter=src.filter,
            hive_partitioning=self.hive_partitioning if src.hive_partitioning is None
            else src.hive_partitioning, train=src.train, validation=src.validation,
            test=src.test, sources={},
        )  # fmt: skip

    def split(self, name: str) -> SplitConfig | None:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

    @property
    def tables(self) -> dict[str, int | None]:
        """Categorical column -> table rows from `column:rows` entries (None: from vocabulary)."""
        tables: dict[str, int | None] = {}
        for i, entry in enumerate(self.categorical):
            name, sep, rows = str(entry).rpartition(":")
            if not sep and self.vocabulary:
                tables[rows] = None
                continue
            try:
                size = int(rows)
            except ValueError:
                size = None
            if not name or size is None:
                raise ConfigError(
                    f"data.categorical[{i}]={entry!r} is not 'column:rows': write the column "
                    f"and its table size, e.g. {entry}:100000, or set data.vocabulary=true"
                )
            _positive(f"data.categorical[{i}] ({name})", size)
            tables[name] = size
        return tables


@dataclass
class S3ParquetDataConfig(DataConfig):
    """Parquet under an s3:// URI; `path` follows `uri`."""

    uri: str = MISSING


@dataclass
class ModelConfig:
    """Settings every model shares: the embedding tables."""

    _target_: str = MISSING
    embedding_dim: int = 16
    pooling: Pooling = Pooling.sum
    init_std: float = 0.01

    def __post_init__(self) -> None:
        _positive("model.embedding_dim", self.embedding_dim)
        _positive("model.init_std", self.init_std)


@dataclass
class FMConfig(ModelConfig):
    _target_: str = "recsys.models.FM"


@dataclass
class LRConfig(ModelConfig):
    """First-order only: its tables hold one weight per id, so embedding_dim is 0."""

    _target_: str = "recsys.models.LR"
    embedding_dim: int = 0

    def __post_init__(self) -> None:
        if self.embedding_dim != 0:
            raise ConfigError("model.embedding_dim must be 0 for model=lr (no vectors)")
        _positive("model.init_std", self.init_std)


@dataclass
class DNNConfig(ModelConfig):
    """A model with an MLP on top of the embeddings."""

    hidden: list[int] = field(default_factory=lambda: [400, 400, 400])
    dropout: float = 0.1
    batch_norm: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for i, width in enumerate(self.hidden):
            _positive(f"model.hidden[{i}]", width)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} is out of range: use 0 <= p < 1")


@dataclass
class DeepFMConfig(DNNConfig):
    _target_: str = "recsys.models.DeepFM"


@dataclass
class MLPConfig(DNNConfig):
    _target_: str = "recsys.models.MLP"


@dataclass
class DCNv2Config(DNNConfig):
    """DCN-v2: cross layers x_{l+1} = x_0 * (W_l x_l + b_l) + x_l and a DNN."""

    _target_: str = "recsys.models.DCNv2"
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0
    cross_layers: int = 3
    low_rank: int | None = None  # rank r of W = U V^T (U, V: n x r); null: a full n x n W
    structure: CrossStructure = CrossStructure.stacked

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("model.cross_layers", self.cross_layers)
        _positive("model.low_rank", self.low_rank)


@dataclass
class DLRMConfig(ModelConfig):
    """DLRM: dot products of a bottom MLP's dense vector and the embeddings, then a top MLP."""

    _target_: str = "recsys.models.DLRM"
    bottom_hidden: list[int] = field(default_factory=lambda: [64])
    top_hidden: list[int] = field(default_factory=lambda: [256, 128])

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("bottom_hidden", "top_hidden"):
            for i, width in enumerate(getattr(self, key)):
                _positive(f"model.{key}[{i}]", width)


@dataclass
class TwoTowerConfig(DNNConfig):
    """User and item towers over their own columns; trained by in-batch sampled softmax."""

    _target_: str = "recsys.two_tower.TwoTower"
    hidden: list[int] = field(default_factory=lambda: [128])
    dropout: float = 0.0
    # data columns (dense or categorical) of each tower; every data column is in one of them
    user_features: list[str] = field(default_factory=list)
    item_features: list[str] = field(default_factory=list)
    user_id: str | None = None  # the key of user embeddings (recsys.predict)
    item_id: str = MISSING  # ids the item: the corpus is every item id in the data
    output_dim: int = 64
    temperature: float = 0.05  # a row's logit is the cosine of its user and item over this

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("model.output_dim", self.output_dim)
        _positive("model.temperature", self.temperature)


# Keys that model configs of two-tower runs held before they moved to `retrieval`.
RETRIEVAL_KEYS = ("logq_correction", "remove_accidental_hits", "top_k")


@dataclass
class RetrievalConfig:
    """The retrieval task's settings: the loss and metrics of two-tower models."""

    logq_correction: bool = True  # subtract log(item frequency in train) from in-batch logits
    remove_accidental_hits: bool = True  # a row's own item elsewhere in the batch: no negative
    top_k: list[int] = field(default_factory=lambda: [10, 50, 100])  # recall@k, NDCG@k

    def __post_init__(self) -> None:
        if not self.top_k:
            raise ConfigError("retrieval.top_k is empty: give the cutoffs k of recall@k, e.g. [10]")
        for i, k in enumerate(self.top_k):
            _positive(f"retrieval.top_k[{i}]", k)


@dataclass
class DenseOptimizerConfig:
    """A torch optimizer for the dense (non-embedding) parameters."""

    _target_: str = "torch.optim.Adam"
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _positive("trainer.dense_optimizer.lr", self.lr)
        _positive("trainer.dense_optimizer.weight_decay", self.weight_decay, allow_zero=True)


@dataclass
class SparseOptimizerConfig:
    """An optimizer of embedding tables, fused into their backward pass.

    sgd, adagrad and rowwise_adagrad are FBGEMM's kernels; adam is FBGEMM's on CUDA and a
    row-sparse Adam over each batch's rows on CPU (recsys/sparse_adam.py). `eps` (null: 1e-8)
    belongs to adagrad, rowwise_adagrad and adam, `betas` (null: [0.9, 0.999]) to adam; setting
    one the type lacks is refused. No weight decay: FBGEMM's CPU kernels ignore it (measured).
    """

    type: SparseOptimizer = SparseOptimizer.adam
    lr: float = 0.005
    eps: float | None = None
    betas: list[float] | None = None

    def check(self, key: str) -> None:
        """Refuse values out of range and options the type lacks; `key` names it in messages."""
        _positive(f"{key}.lr", self.lr)
        _positive(f"{key}.eps", self.eps)
        if self.eps is not None and self.type is SparseOptimizer.sgd:
            raise ConfigError(
                f"{key}.eps is set but sgd has no eps: remove it, or pick adagrad, "
                "rowwise_adagrad or adam"
            )
        if self.betas is not None and self.type is not SparseOptimizer.adam:
            raise ConfigError(
                f"{key}.betas is set but {self.type.value} has no betas: remove it, or use "
                f"{key}.type=adam"
            )
        if self.betas is not None and (
            len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas)
        ):
            raise ConfigError(
                f"{key}.betas={list(self.betas)} is out of range: give two numbers in [0, 1), "
                "e.g. [0.9, 0.999]"
            )

    @property
    def kwargs(self) -> dict:
        """Keyword arguments of the torch optimizer class that selects the fused kernel."""
        kwargs: dict = {"lr": self.lr}
        if self.type is not SparseOptimizer.sgd:
            kwargs["eps"] = 1e-8 if self.eps is None else self.eps
        if self.type is SparseOptimizer.adam:
            kwargs["betas"] = tuple(self.betas or (0.9, 0.999))
        return kwargs


@dataclass
class LrScheduleConfig:
    """Linear warm-up, then an optional decay to min_ratio x lr; scales both optimizers."""

    warmup_steps: int = 0
    decay: LrDecay = LrDecay.none
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        _positive("trainer.lr_schedule.warmup_steps", self.warmup_steps, allow_zero=True)
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ConfigError(
                f"trainer.lr_schedule.min_ratio={self.min_ratio} is out of range: use 0..1"
            )


@dataclass
class EarlyStoppingConfig:
    """Stop when the monitored validation metric has not improved for `patience` evals."""

    enabled: bool = False
    metric: str | None = None
    patience: int = 3
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        _positive("trainer.early_stopping.patience", self.patience)
        _positive("trainer.early_stopping.min_delta", self.min_delta, allow_zero=True)


class ShardingType(Enum):
    table_wise = "table_wise"
    column_wise = "column_wise"
    table_column_wise = "table_column_wise"
    row_wise = "row_wise"
    table_row_wise = "table_row_wise"


class ComputeKernel(Enum):
    fused = "fused"  # FBGEMM's table-batched kernel, the optimizer fused into backward
    fused_uvm = "fused_uvm"  # CUDA: tables in host memory, reached through unified memory
    fused_uvm_caching = "fused_uvm_caching"  # CUDA: as fused_uvm, hot rows cached on the GPU


@dataclass
class ShardingConfig:
    """Constraints for TorchRec's planner: the sharding types and kernels it may pick per table."""

    types: list[ShardingType] = field(default_factory=lambda: [ShardingType.table_wise])
    compute_kernels: list[ComputeKernel] = field(default_factory=lambda: [ComputeKernel.fused])

    def __post_init__(self) -> None:
        if not self.types:
            raise ConfigError("trainer.sharding.types is empty: allow at least table_wise")
        if not self.compute_kernels:
            raise ConfigError("trainer.sharding.compute_kernels is empty: allow at least fused")


@dataclass
class CheckpointConfig:
    """When checkpoints are written (and always at the end), how many are kept, requeue bound."""

    enabled: bool = True
    every_steps: int | None = None
    every_minutes: float | None = 30.0
    keep_last: int = 2
    max_requeues: int = 3

    def __post_init__(self) -> None:
        _positive("trainer.checkpoint.every_steps", self.every_steps)
        _positive("trainer.checkpoint.every_minutes", self.every_minutes)
        _positive("trainer.checkpoint.keep_last", self.keep_last)
        _positive("trainer.checkpoint.max_requeues", self.max_requeues, allow_zero=True)


@dataclass
class TrainerConfig:
    max_epochs: int = 1
    max_steps: int | None = None
    device: Device = Device.auto
    threads: int | None = None
    dense_optimizer: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig)
    sparse_optimizer: SparseOptimizerConfig = field(default_factory=SparseOptimizerConfig)
    # the first-order weights' tables (lr, fm, deepfm): their own optimizer
    first_order_optimizer: SparseOptimizerConfig = field(
        default_factory=lambda: SparseOptimizerConfig(SparseOptimizer.adagrad, 0.05)
    )
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    lr_schedule: LrScheduleConfig = field(default_factory=LrScheduleConfig)
    grad_clip_norm: float | None = None
    grad_accumulation: int = 1
    eval_every_steps: int | None = None
    max_eval_batches: int | None = None
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    log_every_steps: int = 50
    progress_bar: bool | None = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # auto: continue from the run dir's last complete checkpoint; never; or a checkpoint dir
    resume: str = "auto"

    def __post_init__(self) -> None:
        self.sparse_optimizer.check("trainer.sparse_optimizer")
        self.first_order_optimizer.check("trainer.first_order_optimizer")
        _positive("trainer.max_epochs", self.max_epochs)
        _positive("trainer.max_steps", self.max_steps)
        _positive("trainer.threads", self.threads)
        _positive("trainer.grad_clip_norm", self.grad_clip_norm)
        _positive("trainer.grad_accumulation", self.grad_accumulation)
        _positive("trainer.eval_every_steps", self.eval_every_steps)
        _positive("trainer.max_eval_batches", self.max_eval_batches)
        _positive("trainer.log_every_steps", self.log_every_steps)


@dataclass
class TensorBoardConfig:
    """TensorBoard event files in the run dir (`logger=tensorboard`, the default)."""

    hparams: bool = True  # the run's hyper-parameters with its final metrics (HParams tab)


@dataclass
class MLflowConfig:
    """An MLflow tracking store: runs, their params, metrics and artifacts (`logger=mlflow`)."""

    # sqlite:///file.db (relative to the launch directory), http(s)://host:port, ...
    tracking_uri: str = "sqlite:///mlruns.db"
    experiment: str = "recsys"
    # true: an unreachable store stops the run before training; false: warn and train
    required: bool = True
    # where a new experiment keeps artifacts; null: beside a sqlite file, else the server's
    artifact_location: str | None = None
    log_model: bool = True  # upload model.pt (and an export/ dir in the run dir) as artifacts
    timeout_s: float = 10.0  # of each request; a lost server is given up on, never waited for

    def __post_init__(self) -> None:
        _positive("logger.mlflow.timeout_s", self.timeout_s)


@dataclass
class LoggerConfig:
    """Where a run's curves and results go: any of TensorBoard and MLflow (`logger=[a,b]`)."""

    tensorboard: TensorBoardConfig | None = None
    mlflow: MLflowConfig | None = None


@dataclass
class TrainConfig:
    """The root config of `python -m recsys.train`."""

    model: Any = MISSING
    data: DataConfig = MISSING
    trainer: TrainerConfig = MISSING
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    name: str | None = None
    # a validation metric, a run measure (parameters, samples_per_s), or a list of them for a
    # multi-objective sweep; null: the model's main metric
    objective: Any = None


class Split(Enum):
    train = "train"
    validation = "validation"
    test = "test"


class Embeddings(Enum):
    """Which tower of a two-tower model `recsys.predict` writes."""

    user = "user"
    item = "item"


@dataclass
class RunInputConfig:
    """A finished run and the data to run it on."""

    # a run dir of `recsys.train`, or a registered model: models:/<name>@<alias>, models:/<name>/<n>
    run: str = MISSING
    data: DataConfig | None = None  # null: the run's own data config
    split: Split = Split.test
    threads: int | None = None
    tracking_uri: str | None = None  # of models:/ names; null: $MLFLOW_TRACKING_URI or ./mlruns.db

    def __post_init__(self) -> None:
        _positive("threads", self.threads)


@dataclass
class EvaluateConfig(RunInputConfig):
    """The root config of `python -m recsys.evaluate`."""

    output: str | None = None  # null: <run>/eval.json
    retrieval: RetrievalConfig | None = None  # two-tower; null: the run's own retrieval config


@dataclass
class PredictConfig(RunInputConfig):
    """The root config of `python -m recsys.predict`."""

    output: str = MISSING  # a directory, created (it must not exist yet)
    paths: list[str] | None = None  # files to read instead of the split's, relative to data.path
    embeddings: Embeddings | None = None  # two-tower: user or item vectors
    # input columns copied to the output; null: the tower's id column, or none for scores
    keys: list[str] | None = None
    batch_size: int | None = None  # null: data.eval_batch_size

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("batch_size", self.batch_size)


@dataclass
class ExportConfig(RunInputConfig):
    """The root config of `python -m recsys.export`."""

    output: str = MISSING  # a directory, created (it must not exist yet)
    corpus: bool = True  # two-tower: encode every item of the data into corpus.parquet
    batch_size: int = 8192  # rows a batch when encoding the corpus

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("batch_size", self.batch_size)


@dataclass
class ServeConfig:
    """The root config of `python -m recsys.serve`."""

    run: str = MISSING  # a run dir of recsys.train, or an export dir of recsys.export
    host: str = "127.0.0.1"
    port: int = 8080
    max_rows: int = 4096  # rows a request; more are refused (413)
    max_body_bytes: int = 16 << 20
    k: int = 10  # two-tower: items /recommend returns unless the request says
    threads: int | None = None

    def __post_init__(self) -> None:
        for key in ("max_rows", "max_body_bytes", "k", "threads"):
            _positive(key, getattr(self, key))


class Index(Enum):
    """How `recsys.recommend` finds each user's top-k items."""

    exact = "exact"
    faiss = "faiss"


@dataclass
class RecommendConfig(RunInputConfig):
    """The root config of `python -m recsys.recommend`."""

    output: str = MISSING  # a directory, created (it must not exist yet)
    k: int = 100
    paths: list[str] | None = None  # files of users to read instead of the split's
    exclude_seen: bool = False  # drop items the user interacted with in train
    index: Index = Index.exact
    faiss_index: str = "HNSW32"  # a faiss index factory string (inner product metric)
    faiss_params: str = ""  # e.g. "efSearch=256" or "nprobe=16"
    recall_sample: int = 1000  # users whose faiss results are checked against exact
    batch_size: int = 4096  # users a batch
    slab: int = 65536  # corpus items scored at a time (exact)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("k", "batch_size", "slab"):
            _positive(key, getattr(self, key))
        _positive("recall_sample", self.recall_sample, allow_zero=True)


def cache_root() -> Path:
    """Where generated demo data and downloaded registry models are kept ($RECSYS_CACHE)."""
    return Path(os.environ.get("RECSYS_CACHE") or Path.home() / ".cache" / "recsys")


def demo_dir(name: str = "ctr-v1") -> str:
    """Where an embedded demo data set is generated (once) and cached."""
    return str(cache_root() / "demo" / name)


def register() -> None:
    """Register the schemas and resolvers with Hydra; idempotent."""
    if not OmegaConf.has_resolver("recsys_demo_dir"):
        OmegaConf.register_new_resolver("recsys_demo_dir", demo_dir)
        OmegaConf.register_new_resolver(
            "recsys_first", lambda *args: next((a for a in args if a is not None), None)
        )
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(name="recommend_schema", node=RecommendConfig)
    cs.store(group="schema/data", name="s3_parquet", node=S3ParquetDataConfig)
    cs.store(group="schema/trainer", name="default", node=TrainerConfig)
    for name, node in [
        ("fm", FMConfig),
        ("lr", LRConfig),
        ("deepfm", DeepFMConfig),
        ("mlp", MLPConfig),
        ("two_tower", TwoTowerConfig),
        ("dcn_v2", DCNv2Config),
        ("dlrm", DLRMConfig),
    ]:
        cs.store(group="schema/model", name=name, node=node)


def _target_arguments(target: Any) -> set[str] | None:
    """Keyword arguments the `_target_` callable takes (with the keys of a `**kwargs:
    Unpack[SomeTypedDict]`, as the models' shared Tables); None when it takes any."""
    try:
        called = get_object(str(target))
        params = inspect.signature(called).parameters.values()
    except (ImportError, ValueError, TypeError):
        return set()
    named = {p.name for p in params if p.kind not in (p.POSITIONAL_ONLY, p.VAR_KEYWORD)}
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            hints = typing.get_type_hints(called.__init__ if isinstance(called, type) else called)
            unpacked = typing.get_args(hints.get(p.name))
            if typing.get_origin(hints.get(p.name)) is not typing.Unpack or not unpacked:
                return None
            named |= set(typing.get_type_hints(unpacked[0]))
    return named


def check_keys(node: Any, prefix: str = "") -> None:
    """Keys added with `+` under a typed node: fields of its schema or arguments of its class."""
    if not isinstance(node, DictConfig) or node._is_none():
        return
    schema = OmegaConf.get_type(node)
    if is_dataclass(schema):
        known = {f.name for f in fields(schema)}
        takes = _target_arguments(node.get("_target_")) if "_target_" in known else set()
        for key in node:
            if key in known or takes is None or key in takes:
                continue
            where = prefix.rstrip(".") or "the root config"
            close = difflib.get_close_matches(str(key), sorted(known | takes), n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"its keys: {sorted(known)}."
            raise ConfigError(
                f"{prefix}{key} is not a key of {where} ({node.get('_target_', schema.__name__)})"
                f": {hint} Fix the name or remove the key"
            )
    for key, child in node.items_ex(resolve=False):
        check_keys(child, f"{prefix}{key}.")


def to_object(cfg: Any) -> TrainConfig:
    """Turn a composed config into typed dataclasses, running the key and range checks."""
    check_keys(cfg)
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # omegaconf wraps errors raised in __post_init__
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(str(e).splitlines()[0]) from None
