"""Prefill tiles the earlier sweeps did not try (issue 13, session 18). Session 16's seven (`h100-2026-11-27-prefill/
tune_call3.log`) put 64 x 32 tiles, 4 warps, 3 stages first on short prompts, where ours is 0.63-0.72x SDPA cuDNN.
Those were 64 x 32 and 64 x 64 with 4 warps and 128-row tiles with 8 warps, 2-4 stages deep. This times tiles
that fit two to four programs an SM (shallower pipelines, 4 warps on 128 rows, 64 x 128), both addressings, against the engines' rule, beside SDPA cuDNN: one call with
L2 flushed before it (``kernels.bench.time_us``), medians of interleaved passes. Llama-3.1-8b attention shape,
bf16, block 16, shuffled table, causal, context 0. Each output is checked against the rule's.

python prefill_tiles.py [PASSES] [mid]
"""
from __future__ import annotations

import statistics
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import triton_prefill
from kernels.bench import Cache, causal_flops, interleaved, time_us
from kernels.triton_prefill import PrefillConfig

DEV, DT, HEADS, HD, BS = torch.device("cuda"), torch.bfloat16, 32, 128, 16
SHORT = [PrefillConfig(64, 32, 4, 3), PrefillConfig(64, 32, 4, 2), PrefillConfig(64, 32, 4, 4),
         PrefillConfig(64, 64, 4, 2), PrefillConfig(128, 64, 8, 2), PrefillConfig(128, 64, 4, 2),
         PrefillConfig(128, 32, 8, 2), PrefillConfig(128, 32, 8, 3), PrefillConfig(64, 128, 4, 2)]
LONG = [PrefillConfig(128, 128, 8, 3), PrefillConfig(128, 64, 8, 2), PrefillConfig(128, 64, 4, 2),
        PrefillConfig(64, 128, 4, 2)]
CASES = [(16, 512, SHORT), (32, 256, SHORT), (16, 1024, SHORT), (8, 1024, SHORT), (1, 4096, LONG), (4, 2048, LONG)]
# ``mid``: the rule's boundary (prompts just over SHORT_SEQUENCE keys take 128 x 128 tiles), call 9
MID = [PrefillConfig(128, 128, 8, 3), PrefillConfig(64, 32, 4, 3), PrefillConfig(64, 64, 4, 3)]
CASES_MID = [(2, 2048, MID), (4, 2048, MID), (8, 2048, MID), (2, 4096, MID)]


def name(c: PrefillConfig) -> str:
    return f"{c.block_m}x{c.block_n}w{c.num_warps}s{c.num_stages}"


def case(batch: int, chunk: int, configs: list[PrefillConfig], passes: int) -> None:
    cache = Cache(batch, chunk, DT, DEV)
    q = torch.randn(batch * chunk, HEADS, HD, dtype=DT, device=DEV)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEV) * chunk
    addrs = {"contiguous": (cache.seq_starts, False), "paged": (cache.block_table(BS), True)}
    timers = {}
    for addressing, (addr, paged) in addrs.items():
        def call(config=None, addr=addr, paged=paged):
            return triton_prefill.prefill(q, cache.k, cache.v, qsl, cache.seq_lens, addr, paged=paged,
                                          block_size=BS if paged else 1, scale=HD ** -0.5, max_query_len=chunk,
                                          max_seq_len=chunk, config=config)
        ref = call().float()
        for c in configs:
            err = (call(c).float() - ref).abs().max().item()
            assert err <= 2e-2 * ref.abs().max().item(), (name(c), addressing, err)
            timers[(name(c), addressing)] = (lambda c=c, call=call: time_us(lambda: call(c), 40))
    k4, v4 = (x.view(batch, chunk, 8, HD).transpose(1, 2) for x in (cache.k, cache.v))
    q4 = q.view(batch, chunk, HEADS, HD).transpose(1, 2)

    def sdpa() -> float:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return time_us(lambda: torch.nn.functional.scaled_dot_product_attention(
                q4, k4, v4, is_causal=True, enable_gqa=True), 40)
    timers[("sdpa_cudnn", "-")] = sdpa
    times = {k: statistics.median(v) for k, v in interleaved(timers, passes).items()}
    rule = name(triton_prefill.prefill_config(HD, DT, DEV, chunk))
    flops = causal_flops(batch, 0, chunk)
    sd = times[("sdpa_cudnn", "-")]
    print(f"b{batch} x {chunk}: rule {rule}, SDPA cuDNN {sd:.1f} us", flush=True)
    for c in configs:
        line = [f"  {name(c):12}"]
        for addressing in addrs:
            t = times[(name(c), addressing)]
            line.append(f"{addressing} {t:7.1f} us {flops / t / 1e6:4.0f} TF x rule {t / times[(rule, addressing)]:5.3f}"
                        f" sdpa/x {sd / t:5.3f}")
        print("  ".join(line), flush=True)
    del cache
    torch.cuda.empty_cache()


def main() -> None:
    passes = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for batch, chunk, configs in CASES_MID if "mid" in sys.argv else CASES:
        case(batch, chunk, configs, passes)


if __name__ == "__main__":
    main()
