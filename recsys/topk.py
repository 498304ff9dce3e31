"""Exact top-k of user vectors against an item corpus, a slab of the corpus at a time."""

from __future__ import annotations

import numpy as np
import torch


def top_k(
    users: torch.Tensor,
    items: torch.Tensor,
    k: int,
    slab: int = 65536,
    seen: list[np.ndarray] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and corpus positions [B, min(k, N)] of each user's best items by dot product.

    The corpus is scored `slab` items at a time, so memory is B x (slab + k), never B x N;
    `seen[b]` holds corpus positions user b must not get (already interacted with).
    """
    k = min(k, len(items))
    best_scores = torch.empty(len(users), 0)
    best_positions = torch.empty(len(users), 0, dtype=torch.long)
    if seen is not None:
        rows = np.repeat(np.arange(len(seen)), [len(s) for s in seen])
        cols = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    for start in range(0, len(items), slab):
        scores = users @ items[start : start + slab].T
        if seen is not None:
            inside = (cols >= start) & (cols < start + len(scores[0]))
            scores[rows[inside], cols[inside] - start] = float("-inf")
        positions = torch.arange(start, start + scores.shape[1]).expand(len(users), -1)
        scores = torch.cat([best_scores, scores], 1)
        positions = torch.cat([best_positions, positions], 1)
        best_scores, at = scores.topk(min(k, scores.shape[1]), dim=1)
        best_positions = positions.gather(1, at)
    return best_scores, best_positions
