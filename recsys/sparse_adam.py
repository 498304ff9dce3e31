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
class _Touched:
    """Rows of one kernel a forward pass read: flat element indices [U, D] per width D, and
    their values before backward."""

    elements: list[torch.Tensor]
    before: list[torch.Tensor]


def table_kernels(model: nn.Module) -> list[nn.Module]:
    """FBGEMM's table-batched kernels inside a DMP-sharded model (this rank's)."""
    kernels = []
    for module in model.modules():
        for lookup in getattr(module, "_lookups", []):  # a plain list, not registered modules
            kernels += [k.emb_module for k in getattr(lookup, "_emb_modules", [])]
    return [k for k in kernels if hasattr(k, "weights_host")]


class RowSparseAdam:
    """Adam over the rows each batch touched, on top of the kernels' fused SGD."""

    def __init__(self, kernels: list[nn.Module], lr: float, betas: tuple[float, float], eps: float):
        self.kernels = kernels
        self.param_groups = [{"lr": lr}]  # read and set by the trainer's LR schedule
        self.betas, self.eps = betas, eps
        self.steps = 0
        self.moments = [
            (torch.zeros_like(k.weights_host.detach()), torch.zeros_like(k.weights_host.detach()))
            for k in kernels
        ]
        self._touched: dict[int, _Touched] = {}
        for i, kernel in enumerate(kernels):
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
        counts = offsets[::batch].diff()
        table = torch.repeat_interleave(torch.arange(tables), counts.long())
        widths = kernel.D_offsets.diff().long()
        starts = kernel.weights_offsets[table] + indices.long() * widths[table]
        earlier = self._touched.get(i)
        if earlier is not None:
            starts = torch.cat([starts, *(e[:, 0] for e in earlier.elements)])
        starts = torch.unique(starts)
        width_of = widths[torch.searchsorted(kernel.weights_offsets, starts, right=True) - 1]
        weights = kernel.weights_host.detach()
        elements = [
            starts[width_of == w].unsqueeze(1) + torch.arange(int(w))
            for w in torch.unique(width_of).tolist()
        ]
        self._touched[i] = _Touched(elements, [weights[e] for e in elements])

    @torch.no_grad()
    def step(self) -> None:
        """Turn the SGD that ran in backward into an Adam step on the touched rows."""
        if not self._touched:
            return
        self.steps += 1
        (b1, b2), lr = self.betas, self.param_groups[0]["lr"]
        first, second = 1 - b1**self.steps, 1 - b2**self.steps
        for i, touched in self._touched.items():
            weights, (m, v) = self.kernels[i].weights_host.detach(), self.moments[i]
            for elements, before in zip(touched.elements, touched.before, strict=True):
                grad = (before - weights[elements]) / PROBE_LR
                m_rows = m[elements].mul_(b1).add_(grad, alpha=1 - b1)
                v_rows = v[elements].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                m[elements], v[elements] = m_rows, v_rows
                denom = (v_rows / second).sqrt_().add_(self.eps)
                weights[elements] = before - lr * (m_rows / first) / denom
        self._touched.clear()

    def state_dict(self) -> dict:
        """This rank's moments (its kernels' layout) and the step count."""
        return {"steps": self.steps, "moments": [(m.clone(), v.clone()) for m, v in self.moments]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        for (m, v), (saved_m, saved_v) in zip(self.moments, state["moments"], strict=True):
            m.copy_(saved_m)
            v.copy_(saved_v)
