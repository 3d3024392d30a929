"""Old against new, per engine, and paged against contiguous within each side: medians with 95% bootstrap intervals
(harness.bench.stats).

``python summarize.py RUNS...`` where each RUNS (a folder, or a ``.tgz`` of one holding ``runs/``; several are pooled
by sweep name, as calls 6 and 7's serve runs) has Hydra sweeps named
``{workload}_{side}/`` (side old or new; workloads throughput, seed_8b, longprompt, and session 17's eager: both
engines, 3 repeats each) or
``offline{C}_{side}/`` (the serve workload, paged, C clients).
"""

from __future__ import annotations

import glob
import sys
import tarfile
import tempfile
from pathlib import Path

import pandas as pd

from harness.bench.stats import median_ci, ratio_ci

WORKLOADS = ("throughput", "seed_8b", "longprompt", "eager", "offline64", "offline16")


def _runs(roots: list[Path], name: str) -> pd.DataFrame | None:
    files = [f for runs in roots for f in glob.glob(str(runs / name / "*" / "run.parquet"))]
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else None


def _ci(x: pd.Series, spec: str) -> str:
    e = median_ci(x)
    return f"{spec.format(e.value)} [{spec.format(e.low)}-{spec.format(e.high)}]"


def _ratio(a: pd.Series, b: pd.Series) -> str:
    r = ratio_ci(a, b)
    return f"{r.value:.3f} [{r.low:.3f}-{r.high:.3f}]"


def workload(runs: list[Path], name: str) -> None:
    frames = {side: f for side in ("old", "new") if (f := _runs(runs, f"{name}_{side}")) is not None}
    if not frames:
        return
    print(f"\n{name}\n\n| engine | side | n | output tok/s | roofline efficiency | TTFT p50 s | new / old tok/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    engines = sorted(next(iter(frames.values()))["engine"].unique())
    for engine in engines:
        d = {side: f[f["engine"] == engine] for side, f in frames.items()}
        for side, x in d.items():
            ratio = _ratio(d["new"]["output_tok_s"], d["old"]["output_tok_s"]) if side == "new" and "old" in d else ""
            print(f"| {engine} | {side} | {len(x)} | {_ci(x['output_tok_s'], '{:,.0f}')} | "
                  f"{_ci(x['roofline_efficiency'], '{:.1%}')} | {_ci(x['ttft_p50'], '{:.4f}')} | {ratio} |")
    if {"paged", "contiguous"} <= set(engines):
        for side, f in frames.items():
            p, c = f[f["engine"] == "paged"], f[f["engine"] == "contiguous"]
            print(f"\n{side}: paged / contiguous output tok/s {_ratio(p['output_tok_s'], c['output_tok_s'])}, "
                  f"TTFT p50 {_ratio(p['ttft_p50'], c['ttft_p50'])}")


def main(sources: list[Path]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        roots = []
        for i, src in enumerate(sources):
            if src.suffix == ".tgz":
                with tarfile.open(src) as t:
                    t.extractall(f"{tmp}/{i}", filter="data")
                roots.append(Path(tmp) / str(i) / "runs")
            else:
                roots.append(src)
        for name in WORKLOADS:
            workload(roots, name)


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
