"""Where an eager (prefill) step's host launch time goes: the serve prefill step of step_profile.py (16 x 512 new +
48 decoding, qwen3-0.6b shape), its device kept busy by a sleep kernel so that the launch phase is host work alone,
with timers around every nn.Linear, every kernel op of the model and Triton's launch path (JITFunction.run).
Then the host cost of one bf16 linear call at a shape seen before and at a new token count each call."""

from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch
import triton.runtime.jit as jit

sys.path.insert(0, ".")
from step_profile import add, engine_with, to_decoding  # noqa: E402

from kernels import triton_ops  # noqa: E402

spent: dict[str, float] = defaultdict(float)
calls: dict[str, int] = defaultdict(int)


def timed(name, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t0
            calls[name] += 1
    return wrapper


torch.nn.Linear.forward = timed("nn.Linear", torch.nn.Linear.forward)
jit.JITFunction.run = timed("triton JITFunction.run", jit.JITFunction.run)
for op in ("rms_norm", "add_rms_norm", "silu_and_mul", "rotary_write_kv", "decode_attention", "prefill_attention"):
    setattr(triton_ops, op, timed(f"op {op}", getattr(triton_ops, op)))

engine = engine_with(64, 600, 1, async_scheduling=False)
add(engine, 48, 600, "d")
to_decoding(engine)
times = engine.ledger.log.times
for trial in range(4):
    add(engine, 16, 512, f"p{trial}_")
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    spent.clear()
    calls.clear()
    before = len(times)
    engine.step()
    torch.cuda.synchronize()
    engine.step()
    st = times[before]
    print(f"trial {trial}: launch {st.launch * 1e3:.2f} ms, prepare {st.prepare * 1e3:.2f} ms, gpu {st.gpu * 1e3:.2f} ms")
    for name in sorted(spent, key=lambda n: -spent[n]):
        print(f"    {name:28s} {spent[name] * 1e3:7.2f} ms  {calls[name]:4d} calls  {spent[name] / calls[name] * 1e6:6.1f} us/call")
    for s in list(engine.scheduler.running):
        if s.request.request_id.startswith(f"p{trial}_"):
            engine.abort(s.request.request_id)
    engine.step()
engine.close()

x = {m: torch.randn(m, 1024, dtype=torch.bfloat16, device="cuda") for m in range(8192, 8192 + 120)}
w = torch.randn(4096, 1024, dtype=torch.bfloat16, device="cuda")
for label, ms in (("same shape", [8192] * 113), ("new token count each call", list(range(8192, 8192 + 113)))):
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    t0 = time.perf_counter()
    for m in ms:
        torch.nn.functional.linear(x[m], w)
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    print(f"linear 113 calls, {label}: {t / 113 * 1e6:.1f} us/call")
