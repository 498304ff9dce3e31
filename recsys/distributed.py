"""Process group set-up and TorchRec sharding: DMP with fused sparse optimizers."""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import sys
import warnings
from collections import Counter
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys.config import (
    ComputeKernel,
    Device,
    ShardingConfig,
    ShardingType,
    SparseOptimizer,
    SparseOptimizerConfig,
)
from recsys.errors import ConfigError
from recsys.models import EmbeddingModel
from recsys.sparse_adam import PROBE_LR, RowSparseAdam, Rule, TableGroup, table_kernels

log = logging.getLogger(__name__)
T = TypeVar("T")

SPARSE_OPTIMIZERS = {
    SparseOptimizer.rowwise_adagrad: RowWiseAdagrad,
    SparseOptimizer.adagrad: torch.optim.Adagrad,
    SparseOptimizer.sgd: torch.optim.SGD,
    SparseOptimizer.adam: torch.optim.Adam,
}


def _not_fbgemm_dump(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("[TBE=")


# glibc's mallopt parameters, and what keep_freed_memory sets them to
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOC_SETTINGS = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 256 << 20}


def keep_freed_memory() -> None:
    """Have glibc serve a step's large temporaries (up to 32 MB) from memory it keeps, instead
    of mapping fresh pages for each and returning them: the page faults cost ~8% of a CPU
    training step (measured). Peak memory is unchanged; freed memory stays with the process."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): its allocator's defaults stay
        return
    for param, value in _MALLOC_SETTINGS.items():
        libc.mallopt(param, value)


def quiet_torchrec() -> None:
    """Silence TorchRec's and torch.distributed's advisory warnings on every run."""
    for name in ("torchrec", "fbgemm_gpu", "torch.distributed", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # FBGEMM's table kernels log their arguments through the root logger itself
    logging.getLogger().addFilter(_not_fbgemm_dump)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _export_submitit_env() -> None:
    """In a multi-task submitit job (SLURM or local), set torch.distributed's env:// variables."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:  # the job's layout wins over inherited variables
        env = submitit.helpers.TorchDistributedEnvironment()
        env.export(set_cuda_visible_devices=False, overwrite=True)


def resolve_device(device: Device) -> torch.device:
    _export_submitit_env()
    if device is Device.cuda and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible: use cpu or auto")
    if device is Device.cpu or (device is Device.auto and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group(device: torch.device) -> None:
    """Join torchrun's/SLURM's process group, or make a one-process one without any socket."""
    if dist.is_initialized():
        return
    _export_submitit_env()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend)
    else:
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def is_rank0() -> bool:
    """Whether this process writes the run dir: rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def agree(value: T) -> T:
    """Rank 0's value, on every rank (so all ranks stop together, write to one run dir)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _table_optimizers(
    sparse: SparseOptimizerConfig, first_order: SparseOptimizerConfig | None
) -> list[tuple[str, SparseOptimizerConfig]]:
    """Each kind of table (by name prefix: vectors `t_`, first-order weights `w_`) and its
    optimizer."""
    return [("t_", sparse), ("w_", first_order or sparse)]


def first_order_in_row(
    device: torch.device, sparse: SparseOptimizerConfig, first_order: SparseOptimizerConfig
) -> bool:
    """Whether first-order weights ride in the vectors' rows (one lookup instead of two): when
    the row-sparse Adam updates the vectors and can give that column its own rule."""
    rule_ok = (
        first_order.type is not SparseOptimizer.rowwise_adagrad
    )  # a row's rule, not a column's
    return device.type == "cpu" and sparse.type is SparseOptimizer.adam and rule_ok


def shard(
    model: nn.Module,
    device: torch.device,
    sparse: SparseOptimizerConfig,
    sharding: ShardingConfig,
    first_order: SparseOptimizerConfig | None = None,
) -> DistributedModelParallel:
    """Fuse the tables' optimizers into their backward (`first_order` for the first-order
    weights' tables `w_*`, `sparse` for the rest) and let TorchRec's planner shard them."""
    row_wise = {ShardingType.row_wise, ShardingType.table_row_wise} & set(sharding.types)
    if device.type == "cpu" and row_wise:
        raise ConfigError(
            f"trainer.sharding.types has {sorted(t.value for t in row_wise)}, which needs "
            "reduce_scatter; gloo (the CPU backend) lacks it: use table_wise, column_wise or "
            "table_column_wise on CPU"
        )
    uvm = [k.value for k in sharding.compute_kernels if k is not ComputeKernel.fused]
    if device.type == "cpu" and uvm:
        raise ConfigError(
            f"trainer.sharding.compute_kernels has {uvm}, which keep tables in host memory for a "
            "GPU: on CPU use [fused]"
        )
    for prefix, cfg in _table_optimizers(sparse, first_order):
        params = [p for n, p in model.ebc.named_parameters() if f".{prefix}" in f".{n}"]
        if not params:  # first-order weights in the vectors' rows: no `w_` tables
            continue
        kernel, kwargs = SPARSE_OPTIMIZERS[cfg.type], cfg.kwargs
        if device.type == "cpu" and cfg.type is SparseOptimizer.adam:
            kernel, kwargs = torch.optim.SGD, {"lr": PROBE_LR}  # RowSparseAdam makes it Adam
        apply_optimizer_in_backward(kernel, params, kwargs)
    topology = Topology(world_size=dist.get_world_size(), compute_device=device.type)
    constraints = {
        table.name: ParameterConstraints(
            sharding_types=[t.value for t in sharding.types],
            compute_kernels=[k.value for k in sharding.compute_kernels],
        )
        for table in model.ebc.embedding_bag_configs()
    }
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(model)
    return DistributedModelParallel(model, device=device, plan=plan)


def plan_summary(plan: ShardingPlan) -> str:
    """The plan in one line: how the tables are sharded and how many each rank holds."""
    tables = [p for module in plan.plan.values() for p in module.values()]
    kinds = Counter(f"{p.sharding_type}/{p.compute_kernel}" for p in tables)
    ranks = Counter(r for p in tables for r in set(p.ranks or []))
    return (
        f"{len(tables)} tables ({', '.join(f'{n} {k}' for k, n in kinds.items())}); tables per "
        f"rank: {', '.join(f'{r}: {n}' for r, n in sorted(ranks.items()))}"
    )


class _RankFormatter(logging.Formatter):
    """Another formatter's lines, prefixed with the process's rank."""

    def __init__(self, inner: logging.Formatter | None, rank: int):
        super().__init__()
        self.inner, self.rank = inner or logging.Formatter(), rank

    def format(self, record: logging.LogRecord) -> str:
        return f"[rank {self.rank}] {self.inner.format(record)}"


def log_ranks() -> None:
    """With several ranks, every log line names its rank and only rank 0 logs below warnings."""
    if dist.get_world_size() == 1:
        return
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, _RankFormatter):
            handler.setFormatter(_RankFormatter(handler.formatter, dist.get_rank()))
    if dist.get_rank() != 0:  # what recsys logs is global, or rank 0's share of it
        logging.getLogger("recsys").setLevel(logging.WARNING)


def row_sparse_adam(
    model: DistributedModelParallel,
    device: torch.device,
    sparse: SparseOptimizerConfig,
    first_order: SparseOptimizerConfig | None = None,
) -> RowSparseAdam | None:
    """The tables' Adam on CPU, over the sharded model's kernels; None when no table has it.
    First-order weights in the vectors' rows get `first_order`'s rule in their column."""
    if device.type != "cpu":
        return None
    tables = _table_optimizers(sparse, first_order)
    groups = [TableGroup(p, _rule(c)) for p, c in tables if c.type is SparseOptimizer.adam]
    models = (m for m in model.modules() if isinstance(m, EmbeddingModel))
    column = next((m.first_order_column for m in models), -1)
    if column >= 0:  # only with Adam on the vectors (first_order_in_row): groups[0] is `t_`
        groups[0].first_order, groups[0].first_order_column = _rule(tables[1][1]), column
    return RowSparseAdam(table_kernels(model), groups) if groups else None


def _rule(cfg: SparseOptimizerConfig) -> Rule:
    """The row-sparse optimizer's rule for a table optimizer config."""
    kw = cfg.kwargs
    return Rule(cfg.type, kw["lr"], kw.get("eps", 1e-8), kw.get("betas", (0.9, 0.999)))


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters not updated by a fused optimizer in backward."""
    return [p for _, p in in_backward_optimizer_filter(model.named_parameters())]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain, unsharded CPU tensors of every weight (complete on rank 0)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if dist.get_rank() == 0 else None
            value.gather(dst=0, out=full)
            out[key] = full
        elif hasattr(value, "full_tensor"):  # DTensor
            out[key] = value.full_tensor().cpu()
        else:
            out[key] = value.detach().cpu().clone()
    return out


def torchrun_command(nproc: int) -> list[str]:
    """torchrun with nproc CPU processes, rendezvous on a free loopback port (tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={port}"]  # fmt: skip
