"""Repeat launches of a Triton kernel through its compiled kernel, skipping Triton's per-call binding.

``kernel[grid](...)`` on a ``@triton.jit`` function binds every argument in Python, computes its
specialization and a cache key, and only then launches: 23-35 µs a launch on the GPU machines'
hosts, against 10-17 µs for the compiled kernel's own launcher (``experiments/h100-2026-11-26-roofline/
launch_probe.log``). An eager step launches ~190 kernels, and on a slow host their launch outlasts
their device time. ``fast_launch`` keeps, per kernel, the compiled kernels it has seen, keyed by what
Triton specializes on: every constexpr's value, the launch options, each tensor's dtype and 16-byte
alignment, each integer's class (equal to 1, divisible by 16, its width) and the device. A key not
seen yet takes Triton's own path, which compiles (or finds) the kernel and launches it; later calls
with that key launch the compiled kernel directly, through Triton's public ``CompiledKernel[grid]``.
The key distinguishes at least everything Triton's does, so a call never runs a kernel compiled for
another specialization. Under the interpreter (``TRITON_INTERPRET=1``), or with launch hooks set (a
profiler's), every call takes Triton's path.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from triton import knobs
from triton.runtime.jit import JITFunction

_I32 = 2**31
_I64 = 2**63


def specialization(value: Any) -> Any:
    """What Triton's compiled code depends on in a non-constexpr argument's value."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return bool
    if isinstance(value, int):
        return int, value == 1, value % 16 == 0, -_I32 <= value < _I32, -_I64 <= value < _I64
    if isinstance(value, float):
        return float
    return value  # None, a dtype: part of the key as it is


def _hooked() -> bool:
    """Whether launch hooks are set (a profiler's): Triton 3.6 keeps None or a function, later versions a chain."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


class FastKernel:
    """A ``@triton.jit`` kernel whose ``[grid](*args, **kwargs)`` launches compiled kernels directly on repeat."""

    def __init__(self, fn: JITFunction) -> None:
        self.fn = fn
        params = list(inspect.signature(fn.fn).parameters.values())
        self.names = tuple(p.name for p in params)
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.constexpr = tuple(p.is_constexpr for p in fn.params)
        self.kernels: dict[tuple, Any] = {}

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def key(self, values: tuple, options: tuple) -> tuple:
        return (torch.cuda.current_device(), options,
                *(v if c else specialization(v) for v, c in zip(values, self.constexpr)))

    def launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        n = len(args)
        values = args + tuple(kwargs[name] if name in kwargs else self.defaults[name] for name in self.names[n:])
        options = tuple((k, v) for k, v in kwargs.items() if k not in self.names)
        key = self.key(values, options)
        kernel = self.kernels.get(key)
        if kernel is None or _hooked():
            kernel = self.fn[grid](*args, **kwargs)
            self.kernels[key] = kernel.result() if hasattr(kernel, "result") else kernel
            return
        kernel[tuple(grid) + (1,) * (3 - len(grid))](*values)


def fast_launch(fn: Any) -> Any:
    """``fn`` (a ``@triton.jit`` function) as a ``FastKernel``; the interpreter's functions are returned as they are."""
    return FastKernel(fn) if isinstance(fn, JITFunction) else fn
