"""Adam for embedding tables on CPU: a row-sparse ("lazy") Adam over the rows a batch touched.

FBGEMM's CPU kernels have no Adam. Here each table-batched kernel runs its exact SGD with a fixed
power-of-two rate, which sums every touched row's gradient in backward and subtracts it scaled;
the rows' change gives that gradient back exactly enough, and Adam is applied to those rows
only, as torch's SparseAdam does. Moments live beside the tables, one copy each. A first-order
weight folded into the vector's row (one lookup for both) gets a rule and a state of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from recsys.config import SparseOptimizer

# The SGD rate the kernels run with: a power of two, so gradient = change / PROBE_LR exactly
# up to the rounding of the stored weights, tiny against the gradient at this scale.
PROBE_LR = 2.0**16


@dataclass
class Rule:
    """An element-wise update: adam (state: both moments), adagrad (the second slot holds the
    sum of squared gradients) or sgd (no state)."""

    type: SparseOptimizer
    lr: float
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class TableGroup:
    """Tables (by name prefix) updated by `rule`, but for the row's column `first_order_column`
    (the first-order weight folded into the vector's row), which `first_order` updates."""

    prefix: str
    rule: Rule
    first_order: Rule | None = None
    first_order_column: int = -1


@dataclass
class _Chunk:
    """Rows one forward read from the tables of one class (group, width, first-order column):
    the kernel's units (blocks of `_Layout.unit` weights) they span, [U * width / unit], and
    their values before backward [U, width]."""

    cls: int
    units: torch.Tensor
    before: torch.Tensor


def table_kernels(model: nn.Module) -> list[tuple[nn.Module, list]]:
    """FBGEMM's table-batched kernels inside a DMP-sharded model (this rank's), with their
    (sharded) table configs in kernel order."""
    kernels = []
    for module in model.modules():
        for lookup in getattr(module, "_lookups", []):  # a plain list, not registered modules
            for batched in getattr(lookup, "_emb_modules", []):
                kernels.append((batched.emb_module, list(batched._config.embedding_tables)))
    return [(k, tables) for k, tables in kernels if hasattr(k, "weights_host")]


def _first_column(table) -> int:
    """The table's first column in the full row (column-wise shards start further right)."""
    meta = getattr(table, "local_metadata", None)
    return int(meta.shard_offsets[1]) if meta is not None else 0


class _Layout:
    """One kernel's tables as the optimizer sees them: each table's class (group, width and
    the first-order column inside its shard, -1 for none), or -1 when no group has it; and the
    unit, the widest block of weights every row is made of (a row, when all widths agree), so
    rows are copied as blocks rather than weight by weight."""

    def __init__(self, kernel: nn.Module, tables: list, groups: list[TableGroup]):
        widths = kernel.D_offsets.diff().long()
        self.classes: list[tuple[int, int, int]] = []
        of_table = []
        for table, width in zip(tables, widths.tolist(), strict=True):
            group = next((i for i, g in enumerate(groups) if table.name.startswith(g.prefix)), -1)
            column = groups[group].first_order_column - _first_column(table) if group >= 0 else -1
            cls = (group, width, column if 0 <= column < width else -1)
            if group >= 0 and cls not in self.classes:
                self.classes.append(cls)
            of_table.append(self.classes.index(cls) if group >= 0 else -1)
        self.class_of_table = torch.tensor(of_table)
        self.widths = widths
        self.unit = math.gcd(*widths.tolist())
        self.row_base = kernel.hash_size_cumsum.long()  # each table's first row in the kernel
        self.touched = torch.zeros(int(self.row_base[-1]), dtype=torch.bool)


def _update(rule: Rule, lr: float, steps: int, w: torch.Tensor, g: torch.Tensor, m, v):
    """The rule's new values of weights `w` for gradient `g` at rate `lr`; moments `m`, `v`
    updated in place. A weight whose gradient and moments are zero keeps its value."""
    if rule.type is SparseOptimizer.sgd:
        return w.add(g, alpha=-lr)
    if rule.type is SparseOptimizer.adagrad:
        v.addcmul_(g, g)
        return w.addcdiv(g, v.sqrt().add_(rule.eps), value=-lr)
    b1, b2 = rule.betas  # as torch's Adam: bias corrections in the step size and the denominator
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = v.sqrt().div_(math.sqrt(1 - b2**steps)).add_(rule.eps)
    return w.addcdiv(m, denom, value=-lr / (1 - b1**steps))


class RowSparseAdam:
    """Adam (and the first-order weights' rule) over the rows each batch touched, on top of the
    kernels' fused SGD."""

    def __init__(self, kernels: list[tuple[nn.Module, list]], groups: list[TableGroup]):
        self.kernels = [k for k, _ in kernels]
        self.layouts = [_Layout(k, tables, groups) for k, tables in kernels]
        self.groups = groups
        # the trainer's LR schedule scales these: each group's rule, then its first-order rule
        self.param_groups: list[dict] = []
        self._lr_index: dict[tuple[int, bool], int] = {}
        for i, group in enumerate(groups):
            for first_order, rule in ((False, group.rule), (True, group.first_order)):
                if rule is not None:
                    self._lr_index[i, first_order] = len(self.param_groups)
                    self.param_groups.append({"lr": rule.lr})
        self.steps = 0
        self.moments = [
            (torch.zeros_like(k.weights_host.detach()), torch.zeros_like(k.weights_host.detach()))
            for k in self.kernels
        ]
        self._touched: dict[int, list[_Chunk]] = {}
        for i, kernel in enumerate(self.kernels):
            kernel.register_forward_pre_hook(self._capture_hook(i), with_kwargs=True)

    def _capture_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if torch.is_grad_enabled() and module.training:
                self._capture(i, module, kwargs["indices"], kwargs["offsets"])

        return hook

    def _capture(self, i: int, kernel: nn.Module, indices: torch.Tensor, offsets: torch.Tensor):
        """Remember which rows this forward reads (with an earlier forward's since the last
        step) and their values before backward changes them."""
        layout = self.layouts[i]
        tables = kernel.weights_offsets.numel()
        batch = (offsets.numel() - 1) // tables
        if batch == 0:
            return
        table = torch.repeat_interleave(torch.arange(tables), offsets[::batch].diff().long())
        layout.touched[layout.row_base[table] + indices.long()] = True
        rows = layout.touched.nonzero().squeeze(1)  # sorted, each once: no sort needed
        table = torch.searchsorted(layout.row_base, rows, right=True) - 1
        width = layout.widths[table]
        starts = kernel.weights_offsets[table] + (rows - layout.row_base[table]) * width
        cls_of_row = layout.class_of_table[table]
        blocks = kernel.weights_host.detach().view(-1, layout.unit)
        chunks = []
        for cls, (_, width, _) in enumerate(layout.classes):
            first = starts[cls_of_row == cls] // layout.unit
            units = (first.unsqueeze(1) + torch.arange(width // layout.unit)).flatten()
            if units.numel():
                chunks.append(_Chunk(cls, units, blocks.index_select(0, units).view(-1, width)))
        self._touched[i] = chunks

    @torch.no_grad()
    def step(self) -> None:
        """Turn the SGD that ran in backward into the rules' step on the touched rows."""
        if not self._touched:
            return
        self.steps += 1
        for i, chunks in self._touched.items():
            layout, unit = self.layouts[i], self.layouts[i].unit
            tensors = [
                t.view(-1, unit) for t in (self.kernels[i].weights_host.detach(), *self.moments[i])
            ]
            for chunk in chunks:
                self._step_chunk(chunk, layout.classes[chunk.cls], *tensors)
            layout.touched.zero_()
        self._touched.clear()

    def _step_chunk(self, chunk: _Chunk, cls: tuple[int, int, int], weights, m, v) -> None:
        """The rules' update of one chunk's rows: the row's rule on whole rows (the padding has
        no gradient and no moments, so it keeps its values), then the first-order column's own
        rule from that column's saved moments. `weights`, `m` and `v` are the kernel's, in
        blocks of its unit."""
        group_index, width, column = cls
        units, before = chunk.units, chunk.before
        m_rows, v_rows = (t.index_select(0, units).view(-1, width) for t in (m, v))
        after = weights.index_select(0, units).view(-1, width)
        grad = before.sub(after).mul_(1 / PROBE_LR)
        col = slice(column, column + 1)
        saved = (m_rows[:, col].clone(), v_rows[:, col].clone()) if column >= 0 else None
        new = _update(self.groups[group_index].rule, self._lr(group_index, False), self.steps,
                      before, grad, m_rows, v_rows)  # fmt: skip
        if saved is not None:
            m_col, v_col = m_rows[:, col], v_rows[:, col]
            m_col.copy_(saved[0])
            v_col.copy_(saved[1])
            new[:, col] = _update(self.groups[group_index].first_order,
                                  self._lr(group_index, True), self.steps, before[:, col],
                                  grad[:, col], m_col, v_col)  # fmt: skip
        for tensor, rows in ((m, m_rows), (v, v_rows), (weights, new)):
            tensor.index_copy_(0, units, rows.view(-1, tensor.shape[1]))

    def _lr(self, group_index: int, first_order: bool) -> float:
        """The current rate of a group's rule (its first-order rule's), as the schedule set it."""
        return self.param_groups[self._lr_index[group_index, first_order]]["lr"]

    def state_dict(self) -> dict:
        """This rank's moments (its kernels' layout) and the step count."""
        return {"steps": self.steps, "moments": [(m.clone(), v.clone()) for m, v in self.moments]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        for (m, v), (saved_m, saved_v) in zip(self.moments, state["moments"], strict=True):
            m.copy_(saved_m)
            v.copy_(saved_v)
