"""The serve comparison's table: ``python experiments/h100-2026-11-26-pipeline/compare.py RUNS`` (RUNS: the
unpacked runs.tgz). Medians of the three seeds with 95% bootstrap intervals (harness.bench.stats), the HTTP path
before (old) and after (new) the one-pipeline change, and each against offline."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from harness.bench.stats import median_ci, ratio_ci


def load(root: Path, name: str) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in sorted((root / name).glob("*/run.parquet"))], ignore_index=True)


def main(root: Path) -> None:
    runs = {name: load(root, name) for name in ("offline64", "serve64_new", "serve64_old")}
    for name, df in runs.items():
        assert (df["status"] == "ok").all() and (df["completed"] == 256).all(), name
        tok, ttft = median_ci(df["output_tok_s"]), median_ci(df["ttft_p95"])
        print(f"{name:12s} output tok/s {tok.value:8,.0f} [{tok.low:,.0f}-{tok.high:,.0f}]   "
              f"TTFT p95 {ttft.value:.3f} s [{ttft.low:.3f}-{ttft.high:.3f}]   seeds {sorted(df['seed'])}")
    pairs = (("serve64_new", "serve64_old"), ("serve64_new", "offline64"), ("serve64_old", "offline64"))
    for a, b in pairs:
        tok = ratio_ci(runs[a]["output_tok_s"], runs[b]["output_tok_s"])
        ttft = ratio_ci(runs[a]["ttft_p95"], runs[b]["ttft_p95"])
        print(f"{a} / {b}: output tok/s {tok.value:.3f} [{tok.low:.3f}-{tok.high:.3f}]   "
              f"TTFT p95 {ttft.value:.2f}x [{ttft.low:.2f}-{ttft.high:.2f}]")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
