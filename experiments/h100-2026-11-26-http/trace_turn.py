"""Where a closed-loop slot's turnaround goes: engine finish -> client sees end -> next POST -> engine add."""
import asyncio, json, sys, time, argparse, functools
import os
ROOT = os.environ.get("KVB_ROOT", os.getcwd())
TD = os.environ.get("TRACE_DIR", "/tmp/trace")
os.makedirs(TD, exist_ok=True)
sys.path.insert(0, ROOT)
import benchmarks.http_path as h

ENGINE_LOG = TD + "/engine.json"

def patched_setup(preset, device_s):
    eng, extra = h.synthetic_setup(preset, device_s)
    adds, fins, steps = {}, {}, []
    orig_add, orig_step, orig_close = eng.add_request, eng._step, eng.close
    def add(req):
        adds[req.request_id] = time.perf_counter(); orig_add(req)
    def step():
        t0 = time.perf_counter()
        outs = orig_step()
        t1 = time.perf_counter()
        steps.append((t0, t1, len(outs)))
        for o in outs:
            if o.finished: fins[o.request_id] = t1
        return outs
    def close():
        json.dump({"adds": adds, "fins": fins, "steps": steps}, open(ENGINE_LOG, "w")); orig_close()
    eng.add_request, eng._step, eng.close = add, step, close
    return eng, extra

def serve(port, preset, device_s):
    h.synthetic_setup_orig = h.synthetic_setup
    from harness.serve.app import create_app
    from harness.serve.config import ServerConfig
    from harness.serve.engine_process import EngineProcess
    from harness.serve.lifecycle import make_server
    from harness.serve import serving as sv
    api = {}
    orig_start = sv.Serving.start
    async def start(self, gen, params, arrival):
        api[gen.ids[0]] = [time.perf_counter()]
        try:
            return await orig_start(self, gen, params, arrival)
        finally:
            api[gen.ids[0]].append(time.perf_counter())
    sv.Serving.start = start
    orig_send = EngineProcess._send
    def send(self, message):
        orig_send(self, message)
        rid = getattr(getattr(message, "request", None), "request_id", None)
        if rid in api:
            api[rid].append(time.perf_counter())
    EngineProcess._send = send
    import atexit, signal, gc
    gcstat = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}
    gct = [0.0]
    def cb(phase, info):
        if phase == "start": gct[0] = time.perf_counter()
        else:
            d = time.perf_counter() - gct[0]; g = gcstat[info["generation"]]; g[0] += 1; g[1] += d; g[2] = max(g[2], d)
    gc.callbacks.append(cb)
    if os.environ.get("GC_FREEZE"):
        gc.collect(); gc.freeze()
    def dump_api(*_):
        json.dump(api, open(TD + "/api.json", "w"))
        print("API GC (count, total s, max s) by generation:", gcstat, "tracked objects", len(gc.get_objects()), "frozen", gc.get_freeze_count(), file=sys.stderr)
    signal.signal(signal.SIGUSR2, dump_api)
    loop = EngineProcess(functools.partial(patched_setup, preset, device_s))
    loop.start()
    cfg = ServerConfig(port=port, warmup=False, log_level="warning")
    app = create_app(loop, model_dir=loop.extra.pop("model_dir"), served_names=[h.MODEL_NAME], cfg=cfg,
                     engine_label="synthetic", extra_info={"model_preset": preset})
    import cProfile
    prof = cProfile.Profile() if os.environ.get("PROFILE_API") else None
    if prof:
        import signal
        def dump(*_):
            prof.disable(); prof.dump_stats(TD + "/api.prof")
        signal.signal(signal.SIGUSR1, dump)
        prof.enable()
    try:
        make_server(app, cfg.host, port, drain_s=1.0, log_level=cfg.log_level).run()
    finally:
        if prof:
            prof.disable(); prof.dump_stats(TD + "/api.prof")

def main():
    import contextlib, os, subprocess, httpx, numpy as np
    from pathlib import Path
    p = argparse.ArgumentParser(); p.add_argument("--device-ms", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=64); p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512); p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--preset", default="tiny-qwen3"); p.add_argument("--cold-connections", action="store_true"); p.add_argument("--kv-poll-interval", type=float, default=0.02)
    args = p.parse_args()
    from harness.bench.http.client import StreamClient
    client_log = {}
    orig = StreamClient.stream
    async def stream(self, request):
        rec = client_log.setdefault(request.request_id, {})
        rec["post"] = time.perf_counter()
        try:
            async for out in orig(self, request):
                rec.setdefault("first", time.perf_counter())
                if out.finished: rec["fin_seen"] = time.perf_counter()
                yield out
        finally:
            rec["end"] = time.perf_counter()
    StreamClient.stream = stream
    port = h.free_port()
    code = f"import sys; sys.path[:0]=[{os.path.dirname(os.path.abspath(__file__))!r},{ROOT!r}]; import trace_turn as t; t.serve({port}, {args.preset!r}, {args.device_ms/1e3!r})"
    prof = []
    if prof:
        open("/tmp/trace/srv.py", "w").write(code)
        proc = subprocess.Popen([sys.executable, *prof, "/tmp/trace/srv.py"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    else:
      proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health", timeout=1).status_code == 200: break
            time.sleep(0.1)
        spy = None
        if os.environ.get("PYSPY"):
            spy = subprocess.Popen(["py-spy", "record", "-p", str(proc.pid), "-o", TD + "/api.txt", "--format", "raw", "-r", "400", "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        out = asyncio.run(h.run_http(base, proc.pid, args))
        if spy:
            spy.send_signal(2); spy.wait(30)
    finally:
        import signal
        proc.send_signal(signal.SIGUSR2); time.sleep(1)
        if os.environ.get("PROFILE_API"):
            proc.send_signal(signal.SIGUSR1); time.sleep(2)
        proc.terminate(); proc.wait(30)
    print({k: round(v, 4) for k, v in out.items()})
    eng = json.load(open(ENGINE_LOG))
    tag_ids = {rid.split("-", 1)[1].rsplit("-", 1)[0]: t for rid, t in eng["adds"].items() if "-" in rid}
    fins = {rid.split("-", 1)[1].rsplit("-", 1)[0]: t for rid, t in eng["fins"].items() if "-" in rid}
    # closed loop: the i-th request to end frees the slot of the (i+c)-th request to start
    reqs = sorted((r for r in client_log if r in fins), key=lambda r: client_log[r]["end"])
    posts = sorted((r for r in client_log), key=lambda r: client_log[r]["post"])[args.concurrency:]
    rows = []
    for old, new in zip(reqs, posts):
        f = fins[old]; c = client_log[old]; n = client_log[new]
        rows.append((c["fin_seen"] - f, c["end"] - c["fin_seen"], n["post"] - c["end"], tag_ids[new] - n["post"], tag_ids[new] - f))
    a = np.array(rows) * 1e3
    api = json.load(open(TD + "/api.json"))
    api = {rid.split("-", 1)[1].rsplit("-", 1)[0]: v for rid, v in api.items()}
    b = []
    for new in posts:
        n = client_log[new]; a_ = api[new]
        b.append((a_[0] - n["post"], a_[1] - a_[0], tag_ids[new] - a_[1], a_[2] - tag_ids[new]))
    b = np.array(b) * 1e3
    print("ms: post -> API start | -> pipe send | -> engine add | engine add -> API start returns")
    for q in (10, 50, 90, 99):
        print(q, np.percentile(b, q, axis=0).round(2))
    print("ms: engine fin -> client sees fin | -> stream end | -> next post | post -> engine add | total")
    for q in (10, 50, 90, 99):
        print(q, np.percentile(a, q, axis=0).round(2))

if __name__ == "__main__":
    main()
