"""Old against new on the serve workload offline, and on the head workloads: medians with 95% bootstrap intervals
(harness.bench.stats).

``python summarize.py RUNS`` where RUNS holds ``offline{C}_old/`` and ``offline{C}_new/`` (Hydra sweeps, C clients), or a
``.tgz`` of that folder.
"""

from __future__ import annotations

import glob
import sys
import tarfile
import tempfile
from pathlib import Path

import pandas as pd

from harness.bench.stats import median_ci, ratio_ci

COLUMNS = {"output_tok_s": "{:,.0f}", "roofline_efficiency": "{:.1%}", "gpu_busy_frac": "{:.1%}",
           "tpot_p50": "{:.5f}", "ttft_p95": "{:.4f}"}


def table(runs: Path, clients: int) -> None:
    frames = {}
    for side in ("old", "new"):
        files = glob.glob(str(runs / f"offline{clients}_{side}" / "*" / "run.parquet"))
        if files:
            frames[side] = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if not frames:
        return
    print(f"\n{clients} clients\n")
    print("| side | n | " + " | ".join(COLUMNS) + " |")
    print("| --- | ---: |" + " ---: |" * len(COLUMNS))
    for side, d in frames.items():
        cells = []
        for c, spec in COLUMNS.items():
            e = median_ci(d[c]) if c in d else None
            cells.append("-" if e is None else f"{spec.format(e.value)} [{spec.format(e.low)}-{spec.format(e.high)}]")
        print(f"| {side} | {len(d)} | " + " | ".join(cells) + " |")
    if len(frames) == 2:
        r = ratio_ci(frames["new"]["output_tok_s"], frames["old"]["output_tok_s"])
        print(f"\nnew / old output tok/s: {r.value:.3f} [{r.low:.3f}-{r.high:.3f}]")


def heads(runs: Path) -> None:
    """The head workloads (``{exp}_{side}/``, both engines, 3 repeats each): medians per engine, old against new."""
    for exp in ("throughput", "seed_8b"):
        frames = {side: pd.concat([pd.read_parquet(f) for f in glob.glob(str(runs / f"{exp}_{side}" / "*" / "run.parquet"))],
                                  ignore_index=True)
                  for side in ("old", "new") if glob.glob(str(runs / f"{exp}_{side}" / "*" / "run.parquet"))}
        if len(frames) < 2:
            continue
        print(f"\n{exp}\n\n| engine | side | n | output_tok_s | roofline_efficiency | new / old tok/s |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for engine in sorted(frames["old"]["engine"].unique()):
            d = {side: f[f["engine"] == engine] for side, f in frames.items()}
            r = ratio_ci(d["new"]["output_tok_s"], d["old"]["output_tok_s"])
            for side in ("old", "new"):
                t, e = median_ci(d[side]["output_tok_s"]), median_ci(d[side]["roofline_efficiency"])
                ratio = f"{r.value:.3f} [{r.low:.3f}-{r.high:.3f}]" if side == "new" else ""
                print(f"| {engine} | {side} | {len(d[side])} | {t.value:,.0f} [{t.low:,.0f}-{t.high:,.0f}] | "
                      f"{e.value:.1%} [{e.low:.1%}-{e.high:.1%}] | {ratio} |")


def http(runs: Path) -> None:
    """The serve workload offline against through HTTP (``offline64_{pass}/``, ``http64_{pass}/``): this tree alone."""
    sides = {}
    for side in ("offline64", "http64"):
        files = glob.glob(str(runs / f"{side}_*" / "**" / "run.parquet"), recursive=True)
        if files:
            sides[side] = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if len(sides) < 2:
        return
    print("\nHTTP against offline (64 streams, two API processes)\n")
    print("| path | n | output_tok_s | ttft_p95 | tpot_p50 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for side, d in sides.items():
        t, f, p = median_ci(d["output_tok_s"]), median_ci(d["ttft_p95"]), median_ci(d["tpot_p50"])
        print(f"| {side} | {len(d)} | {t.value:,.0f} [{t.low:,.0f}-{t.high:,.0f}] | {f.value:.4f} [{f.low:.4f}-{f.high:.4f}]"
              f" | {p.value:.5f} [{p.low:.5f}-{p.high:.5f}] |")
    for col in ("output_tok_s", "ttft_p95"):
        r = ratio_ci(sides["http64"][col], sides["offline64"][col])
        print(f"\nHTTP / offline {col}: {r.value:.3f} [{r.low:.3f}-{r.high:.3f}]")


if __name__ == "__main__":
    src = Path(sys.argv[1])
    if src.suffix == ".tgz":
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(src) as t:
            t.extractall(tmp, filter="data")
            for clients in (64, 16):
                table(Path(tmp) / "runs", clients)
            heads(Path(tmp) / "runs")
            http(Path(tmp) / "runs")
    else:
        for clients in (64, 16):
            table(src, clients)
        heads(src)
        http(src)
