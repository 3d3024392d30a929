"""API CPU per request: bursts of 64 streamed requests with max_tokens=1 against the synthetic server."""
import asyncio, os, sys, time, subprocess, contextlib, json
sys.path.insert(0, os.getcwd())
import benchmarks.http_path as h
import httpx, aiohttp, psutil

async def burst(base, n, prompt_len, stream=True):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def one(i):
            body = {"model": "synthetic", "prompt": [300 + (i * 7 + j) % 1000 for j in range(prompt_len)], "max_tokens": 1,
                    "stream": stream, "stream_options": {"include_usage": True, "continuous_usage_stats": True} if stream else None}
            if not stream: body.pop("stream_options")
            async with s.post(base + "/v1/completions", json=body) as r:
                await r.read()
        await asyncio.gather(*(one(i) for i in range(n)))  # warm connections
        api = psutil.Process(PID)
        t = api.cpu_times(); c0 = t.user + t.system; w0 = time.perf_counter()
        for _ in range(10):
            await asyncio.gather(*(one(i) for i in range(n)))
        t = api.cpu_times(); c1 = t.user + t.system
        print(f"prompt {prompt_len} stream={stream}: API CPU per request {1e6*(c1-c0)/(10*n):.0f} us, wall per burst {1e3*(time.perf_counter()-w0)/10:.1f} ms")

port = h.free_port()
code = f"import sys; sys.path[:0]=[{os.getcwd()!r}]; import benchmarks.http_path as h; h.serve({port}, 'tiny-qwen3', 0.003)"
proc = subprocess.Popen([sys.executable, "-c", code])
PID = proc.pid
base = f"http://127.0.0.1:{port}"
try:
    for _ in range(600):
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(base + "/health", timeout=1).status_code == 200: break
        time.sleep(0.1)
    asyncio.run(burst(base, 64, 512))
    spy = subprocess.Popen(["py-spy", "record", "-p", str(PID), "-o", "/tmp/trace/burst.txt", "--format", "raw", "-r", "1000", "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    for _ in range(3):
        asyncio.run(burst(base, 64, 512))
    spy.send_signal(2); spy.wait(30)
finally:
    proc.terminate(); proc.wait(30)
