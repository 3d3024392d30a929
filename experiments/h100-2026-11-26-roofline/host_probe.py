"""Does what ran before in the process change an eager call's host cost? Our decode (b1 x 4,096, paged 16 and
contiguous) and SDPA cuDNN on the dense view, timed as ``kernels.bench.eager_us``, (1) at start, (2) after our
kernels were captured in a CUDA graph, (3) after torch.compile ran FlexAttention (the peers section compiles it
before it takes host costs), (4) after flashinfer was imported."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import triton_ops
from kernels.bench import HEAD_DIM, HEADS, KV_HEADS, Cache, eager_us, time_us

dev, dtype = torch.device("cuda"), torch.bfloat16
cache = Cache(1, 4096, dtype, dev)
q = torch.randn(1, HEADS, HEAD_DIM, dtype=dtype, device=dev)
addrs = {"paged": cache.addressing(16), "contiguous": cache.addressing(0)}
k = cache.k.view(1, 4096, KV_HEADS, HEAD_DIM).transpose(1, 2)
v = cache.v.view(1, 4096, KV_HEADS, HEAD_DIM).transpose(1, 2)
q4 = q.view(1, 1, HEADS, HEAD_DIM).transpose(1, 2)


def sdpa():
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)


def ours(mode):
    return triton_ops.decode_attention(q, cache.k, cache.v, cache.seq_lens, max_seq_len=4096, validate=False,
                                       **addrs[mode])


def report(stage):
    vals = {m: min(eager_us(lambda m=m: ours(m)) for _ in range(3)) for m in addrs}
    vals["sdpa_cudnn"] = min(eager_us(sdpa) for _ in range(3))
    print(f"{stage:38s} " + "  ".join(f"{k} {v:6.1f}" for k, v in vals.items()), flush=True)


report("start")
for m in addrs:
    time_us(lambda m=m: ours(m), 50)
report("after CUDA-graph timing of ours")
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402

flex = torch.compile(flex_attention)
x = torch.randn(1, HEADS, 256, HEAD_DIM, dtype=dtype, device=dev)
flex(x, x, x)
torch.cuda.synchronize()
report("after torch.compile(flex_attention)")
try:
    import flashinfer  # noqa: F401
    report("after import flashinfer")
except ImportError as exc:
    print("flashinfer:", exc)
