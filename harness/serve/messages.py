"""What crosses the pipes between the API server and its engine process: one frozen dataclass per message kind.

Commands go parent -> child (``Command``), events child -> parent (``Event``, after the one
start-up answer, ``Ready`` or ``StartFailed``); each side dispatches on the class. Both
processes run this same module, so they never disagree on a message's shape. Step outputs
travel packed as tuples of their fields (``pack_outputs``): pickling them costs half what
``RequestOutput`` dataclasses cost, on both sides, and a step carries one per sample.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any, TypeAlias

from engines.base import KVStats
from engines.kv.accounting import KVLog
from engines.request import FinishReason, Request, RequestError, RequestOutput
from harness.serve.engine_loop import EngineDead, EngineInfo, StepInfo

PackedOutputs: TypeAlias = list[tuple]  # RequestOutputs as tuples of their fields (pack_outputs)


class _Message:
    """A message pickles as a call to its class with its fields (``__match_args__``: the ``__init__`` order). The
    default of frozen slotted dataclasses (``__getstate__`` and ``__setstate__``, in Python) costs more: a few
    microseconds more pickling per step in the engine process (benchmarks/http_path.py's ``pickle_us_per_step``)."""

    __slots__ = ()

    def __reduce__(self) -> tuple[type, tuple]:
        return type(self), tuple(map(self.__getattribute__, self.__match_args__))  # type: ignore[attr-defined]


# -- parent -> child ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AddRequest(_Message):
    """Add ``request`` to the engine; the child answers with ``Added``."""

    request: Request


@dataclass(frozen=True, slots=True)
class AbortRequest(_Message):
    request_id: str


@dataclass(frozen=True, slots=True)
class AbortAll(_Message):
    """Abort every open request (each gets a final ABORT output)."""


@dataclass(frozen=True, slots=True)
class Stop(_Message):
    """Stop the loop: what is still open is aborted and the engine closes."""


Command: TypeAlias = AddRequest | AbortRequest | AbortAll | Stop


# -- child -> parent: starting ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready(_Message):
    """The engine is built and warm; ``extra`` is what setup() reported besides it (hardware, model directory)."""

    info: EngineInfo
    extra: dict[str, Any]
    snapshot: KVStats


@dataclass(frozen=True, slots=True)
class StartFailed(_Message):
    """Building the engine failed; ``user_error`` when the configuration is at fault."""

    message: str
    user_error: bool


# -- child -> parent: running ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Added(_Message):
    """The answer to an ``AddRequest``: taken (``error`` None), or refused with an exception's class and text.
    Only classes that both processes import cross the pipe (``refused``), so any exception can be answered."""

    request_id: str
    error: tuple[type[Exception], str] | None = None

    @classmethod
    def refused(cls, request_id: str, e: BaseException) -> Added:
        kind = RequestError if isinstance(e, RequestError) else EngineDead if isinstance(e, EngineDead) else RuntimeError
        return cls(request_id, (kind, str(e)))

    def exception(self) -> Exception | None:
        if self.error is None:
            return None
        kind, text = self.error
        return kind(text)


@dataclass(frozen=True, slots=True)
class KVSnapshot(_Message):
    """The KV snapshot outside a step (after an abort, or while idle) when it or the KV log changed, with the
    engine's KV log since the last message (None: empty)."""

    snapshot: KVStats
    kv_log: KVLog | None


@dataclass(frozen=True, slots=True)
class Step(_Message):
    """One engine step: its outputs, the KV snapshot after it (None: unchanged since the last message), the KV log
    since the last message (None: empty), and the child loop's cumulative ``loop_seconds`` (in LOOP_PHASES order)."""

    info: StepInfo
    outputs: PackedOutputs
    snapshot: KVStats | None
    kv_log: KVLog | None
    loop_seconds: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Outputs(_Message):
    """Outputs outside a step: the final ones of requests aborted, or failed when the engine died."""

    outputs: PackedOutputs


@dataclass(frozen=True, slots=True)
class Ended(_Message):
    """A request left without finishing normally (aborted, or failed)."""

    request_id: str
    reason: FinishReason


@dataclass(frozen=True, slots=True)
class Dead(_Message):
    """The engine failed; sent before the failed requests' outputs, so the server refuses new ones first."""

    error: str


@dataclass(frozen=True, slots=True)
class Stopped(_Message):
    """The loop ended (``error`` None: as asked); the last message the child sends."""

    error: str | None


Event: TypeAlias = Added | KVSnapshot | Step | Outputs | Ended | Dead | Stopped


# -- step outputs as tuples -------------------------------------------------------------------------------
_OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(RequestOutput))
_output_values = operator.attrgetter(*_OUTPUT_FIELDS)


def pack_outputs(grouped: dict[str, list[RequestOutput]]) -> PackedOutputs:
    """Outputs as tuples of their fields, in order: pickling them costs half what dataclasses cost, on both sides."""
    return [_output_values(out) for outs in grouped.values() for out in outs]


def unpack_outputs(packed: PackedOutputs) -> dict[str, list[RequestOutput]]:
    """``pack_outputs`` undone: the outputs grouped by request, in their order."""
    grouped: dict[str, list[RequestOutput]] = {}
    for values in packed:
        grouped.setdefault(values[0], []).append(RequestOutput(*values))
    return grouped
