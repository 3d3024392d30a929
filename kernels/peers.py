"""Other libraries' attention beside ours, for ``kernels.bench``: FlashInfer's paged wrappers,
FlexAttention over a paged block mask, and SDPA's flash and cuDNN backends on a dense cache.

``build(name, cache, q, q_len, table)`` does a peer's set-up once, outside any timing (FlashInfer's
``plan()``, the block mask and page maps, the dense views), runs it once, and returns a
:class:`Peer` whose ``call`` is one attention call over the bench's cache: the last ``q_len`` tokens
of each of ``cache.batch`` sequences of ``cache.length`` tokens attend causally to their sequence
(``q_len = 1``: decode). Paged peers read the cache through ``table`` (the block table our paged
kernel is given), so the two read the same logical sequences; dense peers read the contiguous
regions. A peer that its library, backend or the shape rules out, or that runs out of memory,
raises :class:`PeerUnavailable` with the reason, so that the bench records it and goes on.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from kernels.bench import Cache

PEERS = ("flashinfer", "flashinfer_fa2", "flex", "sdpa_flash", "sdpa_cudnn")
PAGED_PEERS = ("flashinfer", "flashinfer_fa2", "flex")
WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace
# Largest |peer - ours| over largest |ours| that still counts as the same result: two bf16
# implementations each round the output once (2^-8 relative), and sum in different orders.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here or at this shape; the message says why."""


@dataclass
class Peer:
    name: str
    call: Callable[[], torch.Tensor]  # one attention call: what the bench times
    layout: Callable[[torch.Tensor], torch.Tensor]  # the call's output as ours: [tokens, heads, head_dim]
    paged: bool  # reads the cache through the block table (else the contiguous regions)
    config: str = ""
    # Entered around every call that is timed or captured (SDPA's backend choice), never inside it.
    context: Callable[[], ContextManager] = contextlib.nullcontext

    def output(self) -> torch.Tensor:
        with self.context():
            return self.layout(self.call())


def max_error(out: torch.Tensor, ours: torch.Tensor) -> float:
    """Largest absolute difference over the largest absolute value of ours (NaN anywhere: inf)."""
    diff = (out.float() - ours.float()).abs().max()
    err = (diff / ours.float().abs().max().clamp_min(1e-30)).item()
    return float("inf") if math.isnan(err) else err


def build(name: str, cache: Cache, q: torch.Tensor, q_len: int, table: torch.Tensor, block_size: int = 16) -> Peer:
    """Peer ``name`` (one of ``PEERS``) set up for this case and run once."""
    builders: dict[str, Callable[[], Peer]] = {
        "flashinfer": lambda: flashinfer_peer(cache, q, q_len, table, block_size, fa2=False),
        "flashinfer_fa2": lambda: flashinfer_peer(cache, q, q_len, table, block_size, fa2=True),
        "flex": lambda: flex_peer(cache, q, q_len, table, block_size),
        "sdpa_flash": lambda: sdpa_peer(cache, q, q_len, SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": lambda: sdpa_peer(cache, q, q_len, SDPBackend.CUDNN_ATTENTION),
    }
    if name not in builders:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    try:
        peer = builders[name]()
        peer.output()  # compiles, JITs and allocates here, not in the first timed call
        return peer
    except torch.OutOfMemoryError as exc:
        raise PeerUnavailable(f"out of memory ({_first_line(exc)})") from exc


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def reason(exc: BaseException) -> str:
    """An exception in one short line, for a row's status."""
    return f"{type(exc).__name__}: {_first_line(exc, 160)}"


# -- FlashInfer ---------------------------------------------------------------------------------


def flashinfer_layout(block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our block table as FlashInfer's page lists (int32, on the table's device): ``indptr`` [B + 1]
    (where each sequence's pages start in ``indices``), ``indices`` (each sequence's pages in
    logical order, sequence after sequence) and ``last_page_len`` [B] (tokens in each sequence's
    last page, 1..page_size; 0 for an empty sequence)."""
    lens = seq_lens.to(block_table.device).long()
    pages = (lens + page_size - 1) // page_size
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32, device=block_table.device)
    indptr[1:] = pages.cumsum(0)
    used = torch.arange(block_table.shape[1], device=block_table.device) < pages.unsqueeze(1)
    last = torch.where(pages > 0, lens - (pages - 1) * page_size, 0)
    return indptr, block_table[used].to(torch.int32), last.to(torch.int32)


def _flashinfer():
    try:
        import flashinfer
    except Exception as exc:  # ImportError, or a failure inside its import
        raise PeerUnavailable(f"flashinfer is not importable: {_first_line(exc)}") from exc
    return flashinfer


def flashinfer_peer(cache: Cache, q: torch.Tensor, q_len: int, table: torch.Tensor, block_size: int,
                    fa2: bool) -> Peer:
    """Decode (``q_len`` 1): ``BatchDecodeWithPagedKVCacheWrapper``. Without ``fa2``, the library's
    default CUDA-core decode kernel: its docs say tensor cores pay off for *large* GQA groups, and
    SGLang's rule takes them only above a group of 4 (ours is 4). With ``fa2``,
    ``use_tensor_cores=True``, which runs the FA2 prefill kernel as decode. Both are planned in
    CUDA-graph mode (fixed index buffers), as serving engines that capture decode use them.
    Prefill: ``BatchPrefillWithPagedKVCacheWrapper``, causal (aligned bottom-right for a chunk
    after context), backend ``auto`` (FA3 on Hopper) or, with ``fa2``, ``fa2``."""
    flashinfer = _flashinfer()
    if not q.is_cuda:
        raise PeerUnavailable("flashinfer needs a CUDA device")
    b, heads, head_dim = cache.batch, q.shape[1], q.shape[2]
    kv_heads = cache.k.shape[1]
    indptr, indices, last_page_len = flashinfer_layout(table, cache.seq_lens, block_size)
    pages = (cache.k.view(-1, block_size, kv_heads, head_dim), cache.v.view(-1, block_size, kv_heads, head_dim))
    workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=q.device)
    common = {"q_data_type": q.dtype, "kv_data_type": cache.k.dtype}
    try:
        if q_len == 1:
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "NHD", use_cuda_graph=True, use_tensor_cores=fa2,
                paged_kv_indptr_buffer=torch.empty_like(indptr), paged_kv_indices_buffer=torch.empty_like(indices),
                paged_kv_last_page_len_buffer=torch.empty_like(last_page_len))
            wrapper.plan(indptr, indices, last_page_len, heads, kv_heads, head_dim, block_size, **common)
            config = "use_tensor_cores (FA2 kernel)" if fa2 else "decode kernel (CUDA cores)"
        else:
            wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2" if fa2 else "auto")
            qo_indptr = torch.arange(b + 1, dtype=torch.int32, device=q.device) * q_len
            wrapper.plan(qo_indptr, indptr, indices, last_page_len, heads, kv_heads, head_dim, block_size,
                         causal=True, **common)
            config = f"backend {getattr(wrapper, '_backend', '?')}"
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError) as exc:  # a JIT build that fails, a shape it refuses
        raise PeerUnavailable(f"flashinfer refused: {_first_line(exc)}") from exc
    return Peer("flashinfer_fa2" if fa2 else "flashinfer", lambda: wrapper.run(q, pages), lambda out: out,
                paged=True, config=config)


# -- FlexAttention ------------------------------------------------------------------------------


def page_maps(block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, n_pages: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Our block table as torch's ``PagedAttention`` holds it (int64, [B, n_pages], -1 where
    unused): ``page_table[b, logical page] = physical page`` and its inverse
    ``physical_to_logical[b, physical page] = logical page``."""
    b, width = block_table.shape
    device = block_table.device
    pages = (seq_lens.to(device).long() + page_size - 1) // page_size
    logical = torch.arange(width, device=device).expand(b, width)
    used = logical < pages.unsqueeze(1)
    page_table = torch.full((b, n_pages), -1, dtype=torch.int64, device=device)
    page_table[:, :width] = torch.where(used, block_table.long(), -1)
    physical_to_logical = torch.full((b, n_pages), -1, dtype=torch.int64, device=device)
    rows = torch.arange(b, device=device).unsqueeze(1).expand(b, width)
    physical_to_logical[rows[used], block_table.long()[used]] = logical[used]
    return page_table, physical_to_logical


def logical_block_mask(seq_lens: torch.Tensor, q_len: int, page_size: int, width: int,
                       q_block: int = 128) -> BlockMask:
    """The logical block mask (one KV block per page, ``width`` pages per sequence) of the last
    ``q_len`` tokens of each sequence attending causally. Decode is built from whole blocks
    directly: ``create_block_mask`` pads the single query row to a whole Q block, which would
    make every block partial and run the mask function (a page-table lookup) everywhere."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    lens = seq_lens.long()
    b, device = len(lens), seq_lens.device
    if q_len == 1:
        full = (lens // page_size).to(torch.int32)
        partial = (lens % page_size > 0).to(torch.int32)
        full_idx = torch.arange(width, dtype=torch.int32, device=device).expand(b, 1, 1, width).contiguous()
        # The partial page, if any, follows the full ones (clamped: the helper maps every entry).
        part_idx = full.clamp(max=width - 1).view(b, 1, 1, 1).expand(b, 1, 1, width).contiguous()
        return BlockMask.from_kv_blocks(partial.view(b, 1, 1), part_idx, full.view(b, 1, 1), full_idx,
                                        BLOCK_SIZE=(q_block, page_size), mask_mod=lambda bi, h, qi, kv: kv < lens[bi],
                                        seq_lengths=(1, width * page_size))
    offset = lens - q_len  # tokens before the chunk: the causal diagonal sits that far right

    def causal(bi, h, qi, kv):
        return (kv <= qi + offset[bi]) & (kv < lens[bi])

    return create_block_mask(causal, b, None, q_len, width * page_size, device=device, BLOCK_SIZE=(q_block, page_size))


def _raise_recompile_limit(limit: int = 256) -> None:
    """One compiled flex_attention serves every case, each a new static shape; past dynamo's
    default limit (8) it would fall back to eager flex, which materialises the scores."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    _raise_recompile_limit()
    return torch.compile(flex_attention, dynamic=False)


def flex_peer(cache: Cache, q: torch.Tensor, q_len: int, table: torch.Tensor, block_size: int,
              compiled: bool = True) -> Peer:
    """``torch.compile(flex_attention)`` over the whole cache as one [1, KV heads, slots, D] tensor,
    with torch's ``PagedAttention`` helper turning a logical block mask into one over the
    physical pages. Its KV block is a page, so its kernel tile is at most ``block_size`` keys wide
    (``BLOCK_N``; flex requires the sparse block to be a multiple of it). ``compiled=False``: the
    eager reference path (tests, on the CPU)."""
    try:
        from torch.nn.attention.experimental._paged_attention import PagedAttention
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        raise PeerUnavailable(f"torch {torch.__version__} has no FlexAttention paged helper: {exc}") from exc
    b, heads, head_dim = cache.batch, q.shape[1], q.shape[2]
    n_pages = cache.k.shape[0] // block_size
    helper = PagedAttention(n_pages, block_size, b, device=str(q.device))
    page_table, physical_to_logical = page_maps(table, cache.seq_lens, block_size, n_pages)
    helper.page_table.copy_(page_table)
    helper.physical_to_logical.copy_(physical_to_logical)
    mask = helper.convert_logical_block_mask(logical_block_mask(cache.seq_lens, q_len, block_size, table.shape[1]))
    qf = q.view(b, q_len, heads, head_dim).transpose(1, 2)
    kf, vf = (x.unsqueeze(0).transpose(1, 2) for x in (cache.k, cache.v))  # [1, KV heads, slots, D]
    fn = _compiled_flex() if compiled else flex_attention
    options = {"BLOCK_N": block_size}
    try:
        fn(qf, kf, vf, block_mask=mask, enable_gqa=True, kernel_options=options)  # compile now
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # a lowering or Triton compile failure at this shape
        raise PeerUnavailable(f"flex_attention failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    return Peer("flex", lambda: fn(qf, kf, vf, block_mask=mask, enable_gqa=True, kernel_options=options),
                lambda out: out.transpose(1, 2).reshape(b * q_len, heads, head_dim), paged=True,
                config=f"{'compiled' if compiled else 'eager'}, paged block mask, BLOCK_N {block_size}")


# -- SDPA ---------------------------------------------------------------------------------------


def sdpa_peer(cache: Cache, q: torch.Tensor, q_len: int, backend: SDPBackend) -> Peer:
    """``F.scaled_dot_product_attention`` restricted to ``backend``, over [B, H, L, D] views of the
    contiguous regions (no copy). GQA through ``enable_gqa``; where the backend refuses it, K and V
    expanded to every query head once, outside timing (``config`` says so). A chunk after
    context needs a bottom-right causal mask: ``causal_lower_right``, which torch routes to
    flash (or memory-efficient) attention only, so cuDNN times context-0 prefills alone."""
    from torch.nn.attention.bias import causal_lower_right

    b, length = cache.batch, cache.length
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = cache.k.shape[1]
    context = length - q_len
    lower_right = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
    if q_len > 1 and context and backend not in lower_right:
        raise PeerUnavailable(f"SDPA {backend.name}: torch has no bottom-right causal mask for it "
                              "(causal_lower_right runs on flash or memory-efficient attention); context-0 prefills only")
    q4 = q.view(b, q_len, heads, head_dim).transpose(1, 2)
    k4, v4 = (x.view(b, length, kv_heads, head_dim).transpose(1, 2) for x in (cache.k, cache.v))
    mask: dict = {}
    if q_len > 1:
        mask = {"attn_mask": causal_lower_right(q_len, length)} if context else {"is_causal": True}
    layout = lambda out: out.transpose(1, 2).reshape(b * q_len, heads, head_dim)  # noqa: E731
    attempts: list[tuple[str, Callable[[], tuple[torch.Tensor, torch.Tensor]], dict]] = [
        ("enable_gqa", lambda: (k4, v4), {"enable_gqa": True})]
    if heads != kv_heads:  # expanded only once native GQA is refused: 4x the cache
        attempts.append((f"K/V expanded to {heads} heads outside timing",
                         lambda: tuple(x.repeat_interleave(heads // kv_heads, dim=1) for x in (k4, v4)), {}))
    reasons = []
    for config, kv, gqa in attempts:
        try:
            call = functools.partial(F.scaled_dot_product_attention, q4, *kv(), **mask, **gqa)
            with sdpa_kernel(backend):
                call()
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, ValueError) as exc:  # "No available kernel", GQA refused
            reasons.append(f"{config}: {_first_line(exc)}")
            continue
        name = f"sdpa_{backend.name.lower().removesuffix('_attention')}"
        return Peer(name, call, layout, paged=False, config=config + (", causal_lower_right" if "attn_mask" in mask else ""),
                    context=lambda: sdpa_kernel(backend))
    raise PeerUnavailable(f"SDPA {backend.name} refused: " + "; ".join(reasons))
