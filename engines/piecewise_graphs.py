"""Piecewise CUDA graphs for steps a whole-step graph cannot hold: prompt chunks, mixed and large batches.

A step's attention launch depends on the batch's makeup (how many decodes, which prompt chunks, how long), but
everything between two attentions (norms, projections, the MLP, the rotation and the K/V write) depends only on the
number of tokens. So that part replays as CUDA graphs, one per piece (``CausalLM.first_piece``, ``middle_piece``,
``last_piece``) and per padded token count, and each layer's attention runs eagerly between them, as vLLM's
piecewise graphs do. A step then launches L attentions and L + 1 replays instead of every kernel of the model:
its host cost no longer grows with the model's kernel count, so an eager step on a slow host stops leaving the
device idle.

The pieces read and write only the buffers here, sized for the largest token count: the step's ids, positions
and slots, the queries, attention's output, the residual stream (updated in place) and the hidden states. Padding
rows compute on stale (finite) values and write no K/V (slot -1); no row reads another, so they change nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engines.kv.metadata import AttentionMetadata
from engines.model.decoder import CausalLM


def piecewise_sizes(max_tokens: int, step: int) -> list[int]:
    """Token counts to capture: powers of two from 8 below ``step``, then ``step``'s multiples, then ``max_tokens``.
    A step pads up to the next size: by under ``step`` tokens, or under double below it."""
    if max_tokens < 1 or step < 1:
        raise ValueError(f"max_tokens and step must be >= 1, got {max_tokens} and {step}")
    small = [s for s in (8 << i for i in range(step.bit_length())) if s < step]
    return sorted({s for s in small + list(range(step, max_tokens + 1, step)) if s < max_tokens} | {max_tokens})


@dataclass
class PieceBuffers:
    """What the pieces read and write, for up to ``len(ids)`` tokens."""

    ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    slots: torch.Tensor  # [T] long; -1 writes nothing
    q: torch.Tensor  # [T, heads, head_dim]: the current layer's rotated queries
    attn_out: torch.Tensor  # [T, heads, head_dim]: its attention output
    residual: torch.Tensor  # [T, hidden]
    hidden: torch.Tensor  # [T, hidden]: the last piece's output

    @classmethod
    def allocate(cls, model: CausalLM, tokens: int) -> "PieceBuffers":
        c, device, dtype = model.cfg, model.device, model.dtype
        heads = model.layers[0].self_attn.num_heads
        index = lambda fill: torch.full((tokens,), fill, dtype=torch.long, device=device)  # noqa: E731
        rows = lambda *shape: torch.zeros(tokens, *shape, dtype=dtype, device=device)  # noqa: E731
        return cls(index(0), index(0), index(-1), rows(heads, c.head_dim), rows(heads, c.head_dim),
                   rows(c.hidden_size), rows(c.hidden_size))

    @staticmethod
    def nbytes(model: CausalLM, tokens: int) -> int:
        """Their size, before allocating them (the KV budget leaves it out)."""
        if tokens == 0:
            return 0
        c = model.cfg
        heads = c.num_heads // model.tp.size
        return tokens * (3 * 8 + model.dtype.itemsize * (2 * heads * c.head_dim + 2 * c.hidden_size))


class PiecewiseGraphs:
    """The pieces of a forward at each size of ``piecewise_sizes``, captured as CUDA graphs sharing one memory pool
    (``capture=False`` runs each piece eagerly instead: the same buffers and padding, for a CPU test)."""

    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, max_tokens: int, step: int, capture: bool) -> None:
        self.model = model
        self.sizes = piecewise_sizes(max_tokens, step)
        self.buffers = PieceBuffers.allocate(model, self.sizes[-1])
        self.caches = [(kv_cache[i, 0], kv_cache[i, 1]) for i in range(len(model.layers))]
        self.kv_cache = kv_cache
        self.pieces: dict[int, list[Callable[[], None]]] = {}
        pool = None
        for b in reversed(self.sizes):  # largest first: smaller sizes reuse its pool's blocks
            pieces = self._pieces(b)
            if capture:
                for piece in pieces:  # warm up outside the capture, as _DecodeGraphs does
                    piece()
                torch.cuda.synchronize()
                graphs = []
                for piece in pieces:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        piece()
                    pool = graph.pool()
                    graphs.append(graph)
                pieces = [g.replay for g in graphs]
            self.pieces[b] = pieces
        if capture:
            torch.cuda.synchronize()

    def _pieces(self, b: int) -> list[Callable[[], None]]:
        """The forward of ``b`` tokens in ``len(layers) + 1`` calls that each read and write only the buffers."""
        m, buf, cache = self.model, self.buffers, self.kv_cache
        ids, pos, slots = buf.ids[:b], buf.positions[:b], buf.slots[:b]
        q, out, res = buf.q[:b], buf.attn_out[:b], buf.residual[:b]

        def first() -> None:
            m.first_piece(ids, pos, cache, slots, q_out=q, residual_out=res)

        def middle(i: int) -> Callable[[], None]:
            def piece() -> None:
                m.middle_piece(i, out, res, pos, cache, slots, q_out=q, residual_out=res)
            return piece

        def last() -> None:
            m.last_piece(out, res, out=buf.hidden[:b], residual_out=res)

        return [first, *(middle(i) for i in range(1, len(m.layers))), last]

    def padded_size(self, tokens: int) -> int | None:
        """The captured size a step of ``tokens`` runs at; None when it has more tokens than the largest."""
        return next((b for b in self.sizes if b >= tokens), None)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """``CausalLM.forward`` of the step's ``n`` tokens (device tensors; ``n`` at most the largest size): the
        hidden states [n, hidden], a view of the buffers that the next step overwrites."""
        n = ids.shape[0]
        b = self.padded_size(n)
        buf = self.buffers
        buf.ids[:n].copy_(ids)
        buf.positions[:n].copy_(positions)
        buf.slots[:n].copy_(meta.slot_mapping)
        buf.slots[n:b].fill_(-1)  # padding rows write no K/V (an earlier step left real slots there)
        pieces, ops = self.pieces[b], self.model.ops
        q, out = buf.q[:n], buf.attn_out[:n]
        attention = self.model.layers[0].self_attn  # every layer's alike (heads, scale, window): one call repeats
        attend = lambda k, v: attention.attend(q, k, v, meta, ops, out)  # noqa: E731
        pieces[0]()
        for i, ((k_cache, v_cache), piece) in enumerate(zip(self.caches, pieces[1:])):
            if i == 0:  # later layers repeat its launches over their planes (the same buffers, refilled)
                attend = ops.repeatable(attend, k_cache, v_cache)
            else:
                attend(k_cache, v_cache)
            piece()
        return buf.hidden[:n]
