"""Our attention kernels compiled for an H100 (sm_90) on the CPU, with Triton's own ptxas: what the compiler makes
of both addressings, checked where no GPU is.

The paged and contiguous variants of a kernel must differ in their addressing only. What Triton's pipeliner makes
of a loop is not in the source: loaded inside a tile, the block-table entries made it buffer one K/V tile fewer for
the paged prefill than for the contiguous one at the same ``num_stages`` (sm_90, Triton 3.6 and 3.7), so that a
timing of the two measured a shallower pipeline as well as the addressing. Each launch here is recorded as the
wrapper makes it (CPU tensors standing in), with the configuration the wrapper picks on a GPU, then compiled for
sm_90 as Triton would compile it there, and the two variants' shared memory compared. (Decode's split kernel
loads its entries a tile ahead too, but at its two stages an entry load inside the tile costs it no buffer: shared
memory cannot tell there, so it is not tested so.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import triton_prefill  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
GPU = torch.device("cuda")  # only read for its type: the configurations a GPU gets
OPTIONS = ("num_warps", "num_stages", "launch_pdl")
TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
         torch.int64: "*i64"}


def _ptxas_present() -> bool:
    """Triton compiles with the ptxas its wheel bundles, or the one ``TRITON_PTXAS_PATH`` names."""
    named = os.environ.get("TRITON_PTXAS_PATH")
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return Path(named).is_file() if named else bundled.is_file()


pytestmark = pytest.mark.skipif(not _ptxas_present(), reason="Triton's NVIDIA backend has no ptxas here")


def _recorded(monkeypatch: pytest.MonkeyPatch, module: Any, call) -> list[tuple[Any, tuple, dict]]:
    """The launches ``call()`` makes through ``module.launch``: (kernel, args, kwargs), nothing run."""
    launches: list[tuple[Any, tuple, dict]] = []
    monkeypatch.setattr(module, "launch", lambda fn, grid, *args, **kwargs: launches.append((fn, args, kwargs)))
    call()
    return launches


def _compile_sm90(fn: Any, args: tuple, kwargs: dict) -> Any:
    """``fn`` compiled for sm_90 from a recorded launch, as Triton compiles it on an H100: the wrapper's constexprs
    and options, programmatic dependent launch on, pointers and multiples of 16 marked 16-divisible (Triton's
    specialization; every tensor the engines pass is 16-byte aligned)."""
    names = list(fn.arg_names)
    constexprs = {k: v for k, v in kwargs.items() if k not in OPTIONS}
    constexprs.update(PDL=True, UPCAST=False)
    signature, attrs = {}, {}
    for i, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0 and value:
                attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in names if name in constexprs})
    options = {k: kwargs[k] for k in OPTIONS if k in kwargs} | {"launch_pdl": True}
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def _cache(slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(slots, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16),
            torch.empty(slots, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16))


def _addressing(paged: bool, batch: int, length: int) -> tuple[torch.Tensor, int]:
    if paged:
        return torch.zeros(batch, length // BLOCK_SIZE, dtype=torch.int32), BLOCK_SIZE
    return torch.zeros(batch, dtype=torch.int32), 1


def _prefill_shared(monkeypatch: pytest.MonkeyPatch, paged: bool, length: int, window: int | None) -> tuple[int, Any]:
    batch = 2
    k, v = _cache(batch * length)
    q = torch.empty(batch * length, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    qsl = torch.arange(batch + 1, dtype=torch.int32) * length
    lens = torch.full((batch,), length, dtype=torch.int32)
    addr, block_size = _addressing(paged, batch, length)
    config = triton_prefill.prefill_config(HEAD_DIM, torch.bfloat16, GPU, length)
    [(fn, args, kwargs)] = _recorded(monkeypatch, triton_prefill, lambda: triton_prefill.prefill(
        q, k, v, qsl, lens, addr, paged=paged, block_size=block_size, scale=0.1, max_query_len=length,
        max_seq_len=length, window=window, config=config))
    return _compile_sm90(fn, args, kwargs).metadata.shared, config


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 256], ids=["causal", "sliding"])
@pytest.mark.parametrize("length", [512, 4096], ids=["short-tile", "long-tile"])
def test_paged_prefill_buffers_the_same_kv_tiles_as_contiguous(monkeypatch, length, window):
    """Same configuration, same Triton options, same K/V buffers: the paged variant's shared memory exceeds the
    contiguous one's by its block-table entries' buffers alone (4-byte entries, a tile's worth a stage)."""
    contiguous, config = _prefill_shared(monkeypatch, False, length, window)
    paged, _ = _prefill_shared(monkeypatch, True, length, window)
    kv_stage = 2 * config.block_n * HEAD_DIM * 2  # one K and one V tile, bf16
    entries = config.num_stages * config.block_n * 4
    assert contiguous >= config.num_stages * kv_stage, (contiguous, config)
    assert contiguous <= paged <= contiguous + entries, (contiguous, paged, config)
