"""Adam for embedding tables on CPU: a row-sparse ("lazy") Adam over the rows a batch touched.

FBGEMM's CPU kernels have no Adam. Here each table-batched kernel runs its exact SGD with a fixed
power-of-two rate, which sums every touched row's gradient in backward and subtracts it scaled;
the rows' change gives that gradient back exactly enough, and Adam is applied to those rows
only, as torch's SparseAdam does. Moments live beside the tables, one copy each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# The SGD rate the kernels run with: a power of two, so gradient = change / PROBE_LR exactly
# up to the rounding of the stored weights, tiny against the gradient at this scale.
PROBE_LR = 2.0**16


@dataclass
class AdamGroup:
    """The tables (by name prefix) one set of Adam settings applies to."""

    prefix: str
    lr: float
    betas: tuple[float, float]
    eps: float


@dataclass
class _Chunk:
    """Rows one forward read from the tables of one group and width: flat element indices
    [U, D] and their values before backward."""

    group: int
    elements: torch.Tensor
    before: torch.Tensor


def table_kernels(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """FBGEMM's table-batched kernels inside a DMP-sharded model (this rank's), with the names
    of their tables in kernel order."""
    kernels = []
    for module in model.modules():
        for lookup in getattr(module, "_lookups", []):  # a plain list, not registered modules
            for batched in getattr(lookup, "_emb_modules", []):
                names = [t.name for t in batched._config.embedding_tables]
                kernels.append((batched.emb_module, names))
    return [(k, names) for k, names in kernels if hasattr(k, "weights_host")]


class RowSparseAdam:
    """Adam over the rows each batch touched, on top of the kernels' fused SGD."""

    def __init__(self, kernels: list[tuple[nn.Module, list[str]]], groups: list[AdamGroup]):
        self.kernels = [k for k, _ in kernels]
        self.groups = groups
        self.param_groups = [{"lr": g.lr} for g in groups]  # the trainer's LR schedule sets them
        # each table's group, by kernel (-1: not ours)
        self.group_of = [
            torch.tensor(
                [
                    next((i for i, g in enumerate(groups) if n.startswith(g.prefix)), -1)
                    for n in names
                ]
            )  # fmt: skip
            for _, names in kernels
        ]
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
        """Remember which rows this forward reads (merged with an earlier forward's) and their
        values before backward changes them."""
        tables = kernel.weights_offsets.numel()
        batch = (offsets.numel() - 1) // tables
        if batch == 0:
            return
        table = torch.repeat_interleave(torch.arange(tables), offsets[::batch].diff().long())
        widths = kernel.D_offsets.diff().long()
        starts = kernel.weights_offsets[table] + indices.long() * widths[table]
        starts = torch.cat([starts, *(c.elements[:, 0] for c in self._touched.get(i, []))])
        starts = torch.unique(starts)
        table = torch.searchsorted(kernel.weights_offsets, starts, right=True) - 1
        key = self.group_of[i][table] * (int(widths.max()) + 1) + widths[table]
        weights = kernel.weights_host.detach()
        chunks = []
        for k in torch.unique(key).tolist():
            group, width = divmod(k, int(widths.max()) + 1)
            if group < 0:
                continue
            elements = starts[key == k].unsqueeze(1) + torch.arange(width)
            chunks.append(_Chunk(group, elements, weights[elements]))
        self._touched[i] = chunks

    @torch.no_grad()
    def step(self) -> None:
        """Turn the SGD that ran in backward into an Adam step on the touched rows."""
        if not self._touched:
            return
        self.steps += 1
        for i, chunks in self._touched.items():
            weights, (m, v) = self.kernels[i].weights_host.detach(), self.moments[i]
            for chunk in chunks:
                group, lr = self.groups[chunk.group], self.param_groups[chunk.group]["lr"]
                (b1, b2), e = group.betas, chunk.elements
                grad = (chunk.before - weights[e]) / PROBE_LR
                m_rows = m[e].mul_(b1).add_(grad, alpha=1 - b1)
                v_rows = v[e].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                m[e], v[e] = m_rows, v_rows
                denom = (v_rows / (1 - b2**self.steps)).sqrt_().add_(group.eps)
                weights[e] = chunk.before - lr * (m_rows / (1 - b1**self.steps)) / denom
        self._touched.clear()

    def state_dict(self) -> dict:
        """This rank's moments (its kernels' layout) and the step count."""
        return {"steps": self.steps, "moments": [(m.clone(), v.clone()) for m, v in self.moments]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        for (m, v), (saved_m, saved_v) in zip(self.moments, state["moments"], strict=True):
            m.copy_(saved_m)
            v.copy_(saved_v)
