"""Where does a SIGKILLed worker over NCCL hang rank 0? Variant from argv: graphs | eager | poll."""
import faulthandler, os, signal, sys, time, threading
faulthandler.dump_traceback_later(20, repeat=True, file=sys.stderr)
import torch
from engines import create_engine
from engines.config import PagedConfig
from engines.request import Request, SamplingParams
from engines.tensor_parallel import driver
from engines.tensor_parallel.driver import WorkerFailed, ShardedModel
from engines import model_runner
from harness.models.make_model import ensure_model

T0 = time.monotonic()
def log(*a): print(f"[{time.monotonic()-T0:7.2f}] [{threading.current_thread().name}]", *a, flush=True)
real_abort = driver._abort_group
def abort():
    log("abort: start"); real_abort(); log("abort: returned")
driver._abort_group = abort
variant = sys.argv[1]
ARMED = []
real_send = ShardedModel._send
def send(self, msg):
    real_send(self, msg)
    if ARMED and type(msg).__name__ in ("Replay", "Forward"):
        ARMED.clear()
        log("kill right after sending", type(msg).__name__)
        os.kill(self._procs[0].pid, signal.SIGKILL)
ShardedModel._send = send
if "poll" in variant:
    real_wait = model_runner.ModelRunner.wait
    def wait(self, step):
        if step.ready is not None:
            while not step.ready.query():
                if isinstance(self.model, ShardedModel):
                    self.model.check()
                time.sleep(0.0005)
        return real_wait(self, step)
    model_runner.ModelRunner.wait = wait
if __name__ == "__main__":
    engine = create_engine(ensure_model("qwen3-0.6b"), PagedConfig(tensor_parallel_size=2, gpu_memory_utilization=0.5,
                                                                    enforce_eager="eager" in variant))
    for i in range(16):
        engine.add_request(Request(f"r{i}", [7 + i] * 200, SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)))
    for _ in range(20):
        engine.step()
    (worker,) = engine.model._procs
    ARMED.append(1)
    n = 0
    try:
        while engine.has_unfinished():
            engine.step(); n += 1
            if n % 50 == 0: log("steps after kill", n)
    except WorkerFailed as e:
        log("WorkerFailed after", n, "steps:", str(e)[:200])
    try:
        engine.step()
    except WorkerFailed as e:
        log("later call raises:", str(e)[:80])
    log("close: start"); engine.close(); log("close: returned")
    print("exiting", flush=True)
