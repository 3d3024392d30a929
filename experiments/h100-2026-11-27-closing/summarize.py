"""The record's figures, from its archives: medians of the repeats with 95% bootstrap intervals
(``harness.bench.stats``), the step anatomy, HTTP / offline ratios, and decode's split counts timed hot and cold.

Run from the repo root: ``python experiments/h100-2026-11-27-closing/summarize.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import math
import tarfile
import tempfile
from pathlib import Path

import pandas as pd

from harness.bench.stats import median_ci, ratio_ci
from kernels import bench

HERE = Path(__file__).parent
ANATOMY = ["step_ms", "step_gpu_ms", "host_ms_per_step", "step_schedule_ms", "step_kv_ms", "step_prepare_ms",
           "step_launch_ms", "step_sync_ms", "step_postprocess_ms"]


def fmt(est, spec: str) -> str:
    return f"{spec.format(est.value)} [{spec.format(est.low)}-{spec.format(est.high)}]"


def runs(archive: str, root: Path) -> pd.DataFrame:
    """Every run.parquet in ``archive`` (and in the archives it holds), with its sweep's folder as ``setting``."""
    with tarfile.open(HERE / archive) as t:
        t.extractall(root, filter="data")
    for inner in glob.glob(str(root / "**" / "*.tgz"), recursive=True):
        with tarfile.open(inner) as t:
            t.extractall(Path(inner).parent, filter="data")
    frames = []
    for f in glob.glob(str(root / "**" / "run.parquet"), recursive=True):
        d = pd.read_parquet(f)
        d["setting"] = Path(f).relative_to(root).parts[-3]
        frames.append(d)
    return pd.concat(frames, ignore_index=True)


def workloads(archive: str, call: int, root: Path) -> None:
    """Per sweep folder (a workload, or in the before/after archives a workload and its side) and engine: the run
    figures and the step anatomy."""
    d = runs(archive, root)
    for setting, g in d.groupby("setting"):
        print(f"\n{setting} (call {call})\n\n| engine | n | output tok/s | roofline efficiency | GPU busy | p50 TTFT s | "
              "p95 TTFT s | p50 E2E s | p50 TPOT s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for engine, e in g.groupby("engine"):
            print(f"| {engine} | {len(e)} | {fmt(median_ci(e.output_tok_s), '{:,.0f}')} | "
                  f"{fmt(median_ci(e.roofline_efficiency), '{:.1%}')} | {fmt(median_ci(e.gpu_busy_frac), '{:.1%}')} | "
                  f"{fmt(median_ci(e.ttft_p50), '{:.3f}')} | {fmt(median_ci(e.ttft_p95), '{:.3f}')} | "
                  f"{fmt(median_ci(e.e2e_p50), '{:.3f}')} | {fmt(median_ci(e.tpot_p50), '{:.4f}')} |")
        by = {k: v.output_tok_s for k, v in g.groupby("engine")}
        if {"paged", "contiguous"} <= set(by):
            print(f"\npaged / contiguous output tok/s {fmt(ratio_ci(by['paged'], by['contiguous']), '{:.3f}')}")
        print("\nstep anatomy, ms (medians of the runs' means): " + ", ".join(ANATOMY))
        for engine, e in g.groupby("engine"):
            print(f"  {engine}: " + ", ".join(f"{e[c].median():.2f}" for c in ANATOMY))
    if d.setting.str.endswith("_old").any():
        print("\nafter (new) / before (old), output tok/s:")
        for (name, engine), g in d.assign(name=d.setting.str.rsplit("_", n=1).str[0]).groupby(["name", "engine"]):
            new, old = g[g.setting.str.endswith("_new")], g[g.setting.str.endswith("_old")]
            print(f"  {name} {engine}: {fmt(ratio_ci(new.output_tok_s, old.output_tok_s), '{:.3f}')}")


def serve(root: Path) -> None:
    d = runs("serve_runs_call3.tgz", root)
    offline = d[d.setting == "offline64"]
    print("\nserve workload (call 3; qwen3-0.6b, paged, 256 requests 512/128, 64 closed-loop clients, seeds 0-2)\n")
    print("| setting | n | output tok/s | / offline | p95 TTFT s | / offline | GPU busy | roofline efficiency |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for setting, g in sorted(d.groupby("setting"), key=lambda kv: (kv[0] != "offline64", kv[0])):
        ratio = "" if setting == "offline64" else fmt(ratio_ci(g.output_tok_s, offline.output_tok_s), "{:.3f}")
        ttft = "" if setting == "offline64" else fmt(ratio_ci(g.ttft_p95, offline.ttft_p95), "{:.2f}")
        print(f"| {setting} | {len(g)} | {fmt(median_ci(g.output_tok_s), '{:,.0f}')} | {ratio} | "
              f"{fmt(median_ci(g.ttft_p95), '{:.3f}')} | {ttft} | {fmt(median_ci(g.gpu_busy_frac), '{:.1%}')} | "
              f"{fmt(median_ci(g.roofline_efficiency), '{:.1%}')} |")
    print("\nper run, output tok/s: " + "; ".join(
        f"{s} " + ", ".join(f"{v:,.0f}" for v in g.sort_values("seed").output_tok_s) for s, g in d.groupby("setting")))


def splits() -> None:
    """The rule's split count against the fastest count measured, hot and cold, and against SDPA cuDNN."""
    d = pd.read_csv(HERE / "splits_cold_call1.csv")
    print("\ndecode's split count (call 1): at the rule's count, the worse of the two addressings' time over its own fastest"
          " count, and the slower addressing against SDPA cuDNN")
    print("| mode | mean time over the fastest count | worst | shapes below 0.95x SDPA cuDNN | worst x SDPA |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode, g in d.groupby("mode", sort=False):
        best = g.groupby(["batch", "context", "addressing"]).us.min()
        at = g[g.splits == g.rule].set_index(["batch", "context", "addressing"])
        over = (at.us / best).groupby(level=[0, 1]).max()
        vs = (at.sdpa_cudnn_us / at.us).groupby(level=[0, 1]).min()
        worst = vs.idxmin()
        print(f"| {mode} | {over.mean() - 1:.1%} | {over.max() - 1:.1%} at b{over.idxmax()[0]} x {over.idxmax()[1]} | "
              f"{(vs < 0.95).sum()} of {len(vs)} | {vs.min():.3f} at b{worst[0]} x {worst[1]} |")


def peers() -> None:
    """The bench's peer tables and ratio lines (call 4 stopped before printing them: its time limit came during the
    last prefill shape), from its CSV, by the bench's own summary."""
    fields = {f.name: f.type for f in dataclasses.fields(bench.Row)}
    with open(HERE / "peers_call4" / "kernels_bench.csv") as f:
        rows = [bench.Row(**{k: (float(v) if v else math.nan) if fields[k] == "float" else
                             int(v) if fields[k] == "int" else v for k, v in r.items() if k in fields})
                for r in csv.DictReader(f)]
    print("\n" + "\n".join(bench.peer_summary(rows)))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workloads("heads_runs_call2.tgz", 2, Path(tmp) / "heads")
        serve(Path(tmp) / "serve")
        workloads("before_runs_call5.tgz", 5, Path(tmp) / "before")
        workloads("before8b_runs_call6.tgz", 6, Path(tmp) / "before8b")
    splits()
    peers()


if __name__ == "__main__":
    main()
