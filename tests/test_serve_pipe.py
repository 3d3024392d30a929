"""The pipes between the API server and its engine process never block a sender, and lose or reorder nothing.

The engine process's outbox writes only when the pipe has room and otherwise coalesces what
waits into one batch; the API side writes a command at once when it fits, else queues it for
its writer thread behind the others. The step messages carry outputs as tuples. And the HTTP
path benchmark (benchmarks.http_path) runs end to end at a tiny scale.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time

from engines.request import FinishReason, Request, RequestError, RequestOutput
from harness.serve.engine_loop import EngineDead, StepInfo
from harness.serve.engine_process import EngineProcess
from harness.serve.messages import (
    AbortAll,
    AbortRequest,
    Added,
    AddRequest,
    Dead,
    Ended,
    Step,
    Stop,
    Stopped,
    pack_outputs,
    unpack_outputs,
)
from harness.serve.pipe import Outbox, enlarge, room, unbatch


def read_all(conn, count: int, pause_s: float = 0.0) -> list:
    """Every message (batches taken apart) until ``count`` came, reading slowly if asked."""
    got: list = []
    while len(got) < count:
        got.extend(unbatch(conn.recv()))
        time.sleep(pause_s)
    return got


def test_a_slow_reader_never_blocks_the_outbox_and_gets_everything_in_order():
    reader, writer = multiprocessing.Pipe(duplex=False)
    outbox = Outbox(writer)
    blob = b"x" * 40_000
    n = 3 * outbox.capacity // len(blob)  # three pipes' worth: most of it must wait in the outbox
    got: list = []
    slow = threading.Thread(target=lambda: got.extend(read_all(reader, n, pause_s=0.05)))
    slow.start()
    longest = 0.0
    for i in range(n):
        outbox.put(("step", i, blob))
        t0 = time.perf_counter()
        outbox.flush()
        longest = max(longest, time.perf_counter() - t0)
    outbox.flush(block=True)
    slow.join(30)
    assert [m[1] for m in got] == list(range(n)) and all(m[2] == blob for m in got)
    assert outbox.batches > 0  # the reader fell behind, and what waited went as batches
    assert longest < 0.025  # a flush never waited for the reader (its reads are 50 ms apart)


def test_a_full_pipe_holds_messages_until_there_is_room():
    reader, writer = multiprocessing.Pipe(duplex=False)
    outbox = Outbox(writer)
    outbox.put(("big", b"y" * (room(writer, outbox.capacity) - 100)))
    assert outbox.flush()  # fits in the empty pipe
    outbox.put(("small", 1))
    outbox.put(("small", 2))
    assert not outbox.flush() and outbox.pending == 2  # no room: kept, nothing half-written
    assert reader.recv()[0] == "big"
    assert outbox.flush() and outbox.pending == 0
    assert list(unbatch(reader.recv())) == [("small", 1), ("small", 2)]


def test_what_waits_goes_oldest_first_as_far_as_the_room_goes():
    reader, writer = multiprocessing.Pipe(duplex=False)
    outbox = Outbox(writer)
    piece = room(writer, outbox.capacity) // 4
    for i in range(10):  # two and a half pipes' worth, and no one reads yet
        outbox.put(("step", i, b"p" * piece))
    assert not outbox.flush() and 0 < outbox.pending < 10  # the oldest went, the rest wait
    got = read_all(reader, 10 - outbox.pending)
    while outbox.pending:
        outbox.flush()
        got.extend(unbatch(reader.recv()))
    assert [m[1] for m in got] == list(range(10))


def test_outputs_cross_the_pipe_as_tuples_and_come_back_the_same():
    grouped = {
        "a": [RequestOutput("a", 0, [5], [1.0], num_prompt_tokens=3, first_scheduled_time=0.5),
              RequestOutput("a", 1, [6, 7], [1.0, 1.1], text="hi", finished=True, finish_reason=FinishReason.STOP,
                            stop_reason="!")],
        "b": [RequestOutput("b", 0, [], [], finished=True, finish_reason=FinishReason.ERROR, error="boom")],
    }
    packed = pack_outputs(grouped)
    assert all(type(p) is tuple for p in packed)
    assert unpack_outputs(packed) == grouped and list(unpack_outputs(packed)) == ["a", "b"]


def test_messages_survive_the_pipe_and_a_refused_add_comes_back_as_its_exception_class():
    reader, writer = multiprocessing.Pipe(duplex=False)
    outbox = Outbox(writer)
    sent = [AddRequest(Request("a", [1, 2])), AbortRequest("a"), AbortAll(), Stop(),
            Step(StepInfo(1, 1, 0.01), pack_outputs({"a": [RequestOutput("a", 0, [5], [1.0])]}), None, None, (0.5,)),
            Ended("a", FinishReason.ABORT), Dead("boom"), Stopped(None)]
    for message in sent:
        outbox.put(message)
    outbox.flush(block=True)
    assert read_all(reader, len(sent)) == sent  # one Batch, taken apart in order
    refusals = [Added.refused("a", e) for e in (RequestError("bad"), EngineDead("gone"), KeyError("bug"))]
    assert [type(a.exception()) for a in refusals] == [RequestError, EngineDead, RuntimeError]
    assert str(refusals[0].exception()) == "bad" and Added("a").exception() is None


def test_commands_go_at_once_when_they_fit_and_queue_in_order_when_not():
    proc = EngineProcess(setup=lambda: None)  # never started: its pipes and writer alone
    child_end = proc._child_commands
    proc._send(AbortRequest("first"))
    assert proc._queued == 0 and list(unbatch(child_end.recv())) == [AbortRequest("first")]  # written at once
    big = AddRequest(Request("big", [1], prompt="x" * (proc._command_capacity + 1)))  # cannot fit: the writer thread's job
    proc._send(big)
    proc._send(AbortRequest("second"))  # fits, but must not overtake the queued one
    assert proc._queued == 2
    writer = threading.Thread(target=proc._write, daemon=True)
    writer.start()
    got = read_all(child_end, 2)
    assert got == [big, AbortRequest("second")]
    deadline = time.monotonic() + 5
    while proc._queued and time.monotonic() < deadline:
        time.sleep(0.01)
    proc._send(AbortRequest("third"))  # the backlog is gone: at once again
    assert proc._queued == 0 and list(unbatch(child_end.recv())) == [AbortRequest("third")]
    proc._outbox.put(None)
    writer.join(5)


def test_pipes_are_enlarged_and_their_room_is_known():
    _reader, writer = multiprocessing.Pipe(duplex=False)
    capacity = enlarge(writer)
    assert capacity >= 65536
    free = room(writer, capacity)
    assert 0 < free < capacity
    writer.send_bytes(b"z" * 1000)
    assert room(writer, capacity) == free - 1004  # the payload and its 4-byte length
    messages = 0
    while room(writer, capacity) > 5000:  # writes of a page and a byte, the worst case for the pages they fill
        writer.send_bytes(b"w" * 4097)
        messages += 1
    assert messages > 0  # and none of them blocked


def test_the_http_path_benchmark_runs_at_a_tiny_scale(tmp_path, tiny_model):
    from benchmarks import http_path

    out = tmp_path / "http_path.json"
    assert http_path.main(["--num-requests", "8", "--concurrency", "4", "--prompt-len", "16", "--output-len", "8",
                           "--repeats", "1", "--device-ms", "1", "--out", str(out)]) == 0
    medians = json.loads(out.read_text())["medians"]
    offline, (served,) = medians.pop("offline"), medians.values()
    assert offline["output_tokens"] == served["output_tokens"] == 64
    assert offline["failed"] == served["failed"] == 0
    assert 0 < served["tok_s_ratio"] and 0 < served["in_step_share"] <= 1
    assert served["pickle_us_per_step"] > 0 and served["api_cpu_us_per_token"] >= 0  # CPU time comes in 10 ms ticks
