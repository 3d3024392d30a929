"""Our top-level ``kernels`` package must never pass for Hugging Face's ``kernels``.

transformers imports that package's hub kernels when ``is_kernels_available()`` says it is
installed (it finds the name, then wants a version in a range: [0.16, 0.17) in transformers
5.17, [0.18.2, 0.19) in others). Run in a fresh interpreter: the answer is cached per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kernels

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import kernels
from transformers.utils import import_utils
assert kernels.__file__.startswith({root!r}), kernels.__file__
print(import_utils.is_kernels_available(), import_utils.is_kernels_available("0.18.2", "0.19"))
"""


def test_our_kernels_package_has_no_version():
    assert not hasattr(kernels, "__version__")


def test_transformers_does_not_take_our_package_for_hf_kernels():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["False", "False"], proc.stdout
