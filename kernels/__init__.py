"""Attention and KV-cache kernels: Triton for CUDA, pure torch for CPU and as test oracles.

Every backend module exposes the same functions, with the layout and addressing that
``kernels.reference`` documents: ``write_kv``, ``prefill_attention``, ``decode_attention``,
``copy_blocks`` and ``swap_blocks``, and the decoder's layers ``linear``, ``linear_silu_and_mul``
(SwiGLU's gate and up projections with its activation), ``rms_norm``, ``add_rms_norm``, ``silu_and_mul``,
``rotary_embedding`` and ``rotary_write_kv`` (the rotation with the step's K/V write, one launch on the GPU).

This package shares its name with Hugging Face's ``kernels``; it must never pass for it
(no ``__version__`` here; see tests/test_kernels_name_clash.py).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from kernels.checks import KernelArgumentError

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def load_backend(name: str = "auto", device: torch.device | str = "cpu") -> ModuleType:
    """The kernel module for ``name``; ``auto`` is Triton on CUDA and torch elsewhere."""
    if name not in BACKENDS:
        raise KernelArgumentError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"
    if name == "torch":
        return importlib.import_module("kernels.reference")
    if not triton_available():
        raise KernelArgumentError("kernel backend 'triton' needs the triton package (pip install triton)")
    return importlib.import_module("kernels.triton_ops")


__all__ = ["BACKENDS", "KernelArgumentError", "load_backend", "triton_available"]
