"""Where a serve-workload step's time goes, on the device and on the host (issue 13, session 11).

``python3 step_profile.py PART...``; parts:
  decode   kernels of a graph-replayed decode step at the serve shape (qwen3-0.6b, 64 running, ~600 context)
  prefill  a 16 x 512 prefill step: its kernels, and its host launch cost with the device kept busy (a sleep
           kernel queued first, so the launch phase is host work alone), with a cProfile of that launch
  tail     kernels of a decode call at the throughput tail (4 running, ~1,500 context, 8 steps a call)
  sweep    our prefill kernel over tile configs against SDPA cuDNN at three shapes
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from engines import create_engine
from engines.config import PagedConfig
from engines.request import Request, SamplingParams
from harness.models.make_model import ensure_model


def group(name: str) -> str:
    low = name.lower()
    return ("attention" if "decode" in low or "prefill" in low or "merge" in low or "flash" in low else
            "gemm" if any(k in low for k in ("gemm", "sm90", "cutlass", "nvjet", "matmul", "xmma")) else
            "sampling" if any(k in low for k in ("argmax", "reduce", "topk", "sort", "softmax", "exponential")) else
            "copy" if "copy" in low or "memcpy" in low or "memset" in low else
            "norm/rope/act/kv" if any(k in low for k in ("rms", "rotary", "silu", "norm", "write_kv")) else "other")


def kernel_table(prof, calls: int, title: str, top: int = 20) -> None:
    groups, rows, count = defaultdict(float), [], 0
    for e in prof.key_averages():
        t = e.self_device_time_total
        if t <= 0:
            continue
        groups[group(e.key)] += t
        rows.append((t, e.count, e.key[:90]))
        count += e.count
    total = sum(groups.values())
    print(f"\n## {title}: device {total / calls / 1e3:.3f} ms per call, {count / calls:.0f} kernels per call")
    for g, t in sorted(groups.items(), key=lambda x: -x[1]):
        print(f"  {g:18s} {t / calls / 1e3:8.3f} ms {100 * t / total:5.1f}%")
    for t, n, name in sorted(rows, reverse=True)[:top]:
        print(f"  {t / calls:9.1f} us/call {n // calls:5d}x/call  {name}")


def engine_with(running: int, context: int, steps: int, **kw):
    cfg = PagedConfig(max_num_seqs=running, max_model_len=context + 2048, num_scheduler_steps=steps,
                      enable_prefix_caching=False, gpu_memory_utilization=0.85, **kw)
    return create_engine(ensure_model("qwen3-0.6b", weights=False), cfg)


def add(engine, n: int, context: int, tag: str) -> None:
    vocab = engine.model_config.vocab_size
    for i in range(n):
        engine.add_request(Request(f"{tag}{i}", [(31 * j + 7 * i + len(tag)) % vocab for j in range(context)],
                                   SamplingParams(max_tokens=3000, temperature=0, ignore_eos=True, detokenize=False)))


def to_decoding(engine) -> None:
    while engine.scheduler.waiting or any(not s.is_decoding for s in engine.scheduler.running):
        engine.step()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()


def decode_part(running: int, context: int, steps: int, title: str) -> None:
    engine = engine_with(running, context, steps)
    add(engine, running, context, "d")
    to_decoding(engine)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    kernel_table(prof, 10 * steps, title)
    engine.close()


def prefill_part() -> None:
    engine = engine_with(64, 600, 1, async_scheduling=False)
    add(engine, 48, 600, "d")
    to_decoding(engine)
    times = engine.ledger.log.times
    results = []
    for trial in range(4):
        add(engine, 16, 512, f"p{trial}_")
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000 // 10)  # ~100 ms of device time on a ~2 GHz clock: the host runs ahead
        before = len(times)
        if trial == 3:
            pr = cProfile.Profile()
            pr.enable()
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0
        if trial == 3:
            pr.disable()
        torch.cuda.synchronize()
        engine.step()  # the clock's device span of the step above is read here
        st = [t for t in times[before:]]
        results.append((wall, st[0] if st else None))
        for _ in range(3):
            engine.step()
        for s in list(engine.scheduler.running):
            if s.request.request_id.startswith(f"p{trial}_"):
                engine.abort(s.request.request_id)
        engine.step()
    print("\n## prefill step (16 x 512 new + 48 decoding), device kept busy by a sleep kernel first")
    for wall, st in results:
        if st is not None:
            print(f"  wall {wall * 1e3:7.2f} ms  prepare {st.prepare * 1e3:6.2f}  launch {st.launch * 1e3:6.2f}  "
                  f"sync {st.sync * 1e3:7.2f}  gpu {st.gpu * 1e3:6.2f} ms")
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    print("\n## cProfile of the last prefill step (tottime)\n" + "\n".join(s.getvalue().splitlines()[:60]))
    add(engine, 16, 512, "q")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    kernel_table(prof, 1, "prefill step kernels (16 x 512 + 48 decodes)", top=25)
    engine.close()


# call 1: (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 4, 2),
# (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3), (256, 64, 8, 2) over (1, 0, 4096), (16, 0, 512), (4, 4096, 512)
SWEEP_CONFIGS = [(128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (128, 32, 4, 3), (64, 32, 4, 3)]
SWEEP_SHAPES = [(1, 0, 4096), (16, 0, 512), (4, 4096, 512), (32, 0, 256), (8, 0, 1024), (4, 0, 2048), (2, 1024, 1024)]


def sweep_part() -> None:
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.bench import HEAD_DIM, HEADS, KV_HEADS, Cache, time_us
    from kernels.triton_prefill import PrefillConfig, prefill

    dev, dtype = torch.device("cuda"), torch.bfloat16
    configs = [PrefillConfig(m, n, w, s) for m, n, w, s in SWEEP_CONFIGS]
    print("\n## prefill tile sweep (us; bf16, 16 q heads, 8 kv heads, d 128)")
    for batch, context, chunk in SWEEP_SHAPES:
        total = context + chunk
        cache = Cache(batch, total, dtype, dev)
        q = torch.randn(batch * chunk, HEADS, HEAD_DIM, dtype=dtype, device=dev)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev) * chunk
        # cuDNN on a dense view: the last `chunk` queries over `total` keys, bottom-right causal
        group_ = HEADS // KV_HEADS
        k = cache.k.view(batch, total, KV_HEADS, HEAD_DIM).repeat_interleave(group_, 2).transpose(1, 2)
        v = cache.v.view(batch, total, KV_HEADS, HEAD_DIM).repeat_interleave(group_, 2).transpose(1, 2)
        q4 = q.view(batch, chunk, HEADS, HEAD_DIM).transpose(1, 2)
        line = [f"b{batch} ctx{context} q{chunk}:"]
        if context == 0:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                line.append(f"cudnn {time_us(lambda: F.scaled_dot_product_attention(q4, k, v, is_causal=True), 100):.1f}")
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                line.append(f"flash {time_us(lambda: F.scaled_dot_product_attention(q4, k, v, is_causal=True), 100):.1f}")
        print("  " + "  ".join(line))
        for paged in (False, True):
            addr = cache.block_table(16) if paged else cache.seq_starts
            run = lambda cfg: prefill(q, cache.k, cache.v, qsl, cache.seq_lens, addr, paged=paged,  # noqa: E731
                                      block_size=16, scale=HEAD_DIM**-0.5, max_query_len=chunk, config=cfg)
            ref = run(None)
            out = []
            for cfg in configs:
                try:
                    o = run(cfg)
                    err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                    t = time_us(lambda: run(cfg), 100) if err < 1e-2 else float("nan")
                except Exception as exc:  # past the shared-memory limit
                    t = float("nan")
                    print(f"    {cfg}: {type(exc).__name__}")
                out.append(f"{cfg.block_m}/{cfg.block_n}/w{cfg.num_warps}/s{cfg.num_stages}={t:.1f}")
            print(f"    {'paged' if paged else 'contig'}: " + "  ".join(out))
        del cache, k, v


if __name__ == "__main__":
    for part in sys.argv[1:]:
        t0 = time.time()
        if part == "decode":
            decode_part(64, 600, 1, "serve decode step (64 running, ~600 context, graph)")
        elif part == "tail":
            decode_part(4, 1500, 8, "throughput tail (4 running, ~1,500 context, 8 steps a call)")
        elif part == "prefill":
            prefill_part()
        elif part == "sweep":
            sweep_part()
        print(f"[{part}: {time.time() - t0:.0f} s]", flush=True)
