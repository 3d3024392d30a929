"""Tensor parallelism inside the model: which share of each weight a rank holds, and the collectives that join them.

Megatron-style: the QKV and gate/up projections are split by output rows (column parallel:
each rank computes its heads and its MLP columns), the O and down projections by input
columns (row parallel: each rank's partial sum, joined by one all-reduce after each), the
embedding and LM head by vocabulary rows. A rank holds ``1/size`` of the query and KV heads,
so its KV cache holds its heads of every token. At size 1 every collective is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engines.model.config import ModelConfig


@dataclass(frozen=True)
class TPGroup:
    """This process's place in a tensor-parallel group (``group``: a torch.distributed process group, None at size 1)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[size * rows, ...]``: every rank's ``x`` stacked in rank order."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        # torch 2.13 renamed all_gather_into_tensor (deprecated there; the GPU machines' 2.11 has only the old name)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x.contiguous(), group=self.group)
        return out

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank, in place."""
        if self.size > 1:
            import torch.distributed as dist

            dist.broadcast(x, src=0, group=self.group)
        return x

    def split(self, n: int) -> slice:
        """This rank's rows of ``n`` split evenly (``n`` is a multiple of the size: ``check_divides``)."""
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def vocab_rows(self, vocab: int) -> int:
        """Vocabulary rows per rank: the vocabulary rounded up to a multiple of the size (the last rank's extra rows
        are zero and their logits dropped)."""
        return -(-vocab // self.size)


def check_divides(cfg: ModelConfig, size: int) -> None:
    """A size that splits the query heads, the KV heads and the MLP evenly; else an error naming the numbers."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    for what, n in (("query heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                    ("MLP columns (intermediate_size)", cfg.intermediate_size)):
        if n % size:
            raise ValueError(f"tensor_parallel_size={size} does not divide the model's {n} {what}")
