"""The record's figures from its run tarballs: medians with 95% bootstrap intervals, and piecewise / eager ratios.

Run from the repo root: ``python experiments/h100-2026-11-26-piecewise/summarize.py`` (unpacks to a temp dir).
"""

from __future__ import annotations

import glob
import tarfile
import tempfile
from pathlib import Path

import pandas as pd

from harness.bench.stats import median_ci, ratio_ci

HERE = Path(__file__).parent
COLUMNS = {"output_tok_s": "{:,.0f}", "roofline_efficiency": "{:.1%}", "gpu_busy_frac": "{:.1%}",
           "ttft_p95": "{:.3f}", "tpot_p50": "{:.4f}", "step_launch_ms": "{:.2f}", "host_ms_per_step": "{:.2f}"}


def load(root: Path, tarball: str, group: str) -> pd.DataFrame:
    """Every run.parquet of a tarball, labelled by its top folder (``group`` a glob of it)."""
    dest = root / tarball
    with tarfile.open(HERE / tarball) as t:
        t.extractall(dest, filter="data")
    frames = []
    for f in glob.glob(str(dest / group / "**" / "run.parquet"), recursive=True):
        d = pd.read_parquet(f)
        d["set"] = Path(f).relative_to(dest).parts[-3]
        frames.append(d)
    return pd.concat(frames, ignore_index=True)


def fmt(est, spec: str) -> str:
    return f"{spec.format(est.value)} [{spec.format(est.low)}-{spec.format(est.high)}]"


def table(df: pd.DataFrame, keys: list[str], title: str) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(keys + ["n"] + list(COLUMNS)) + " |")
    print("|" + " --- |" * (len(keys) + 1 + len(COLUMNS)))
    for k, g in df.groupby(keys, sort=True):
        k = k if isinstance(k, tuple) else (k,)
        cells = [fmt(median_ci(g[c]), s) if c in g and g[c].notna().any() else "-" for c, s in COLUMNS.items()]
        print("| " + " | ".join(map(str, k)) + f" | {len(g)} | " + " | ".join(cells) + " |")


def ratio(df: pd.DataFrame, by: str, num: str, den: str, column: str = "output_tok_s", within: str | None = None):
    groups = [(None, df)] if within is None else list(df.groupby(within))
    for w, g in groups:
        r = ratio_ci(g[g[by] == num][column], g[g[by] == den][column])
        print(f"- {column} {num} / {den}{'' if w is None else f' ({w})'}: {r.value:.3f} [{r.low:.3f}-{r.high:.3f}]")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        serve2 = load(root, "serve_call2.tgz", "serve")
        serve2["mode"] = serve2["set"].str.extract(r"offline64-(\w+)-")[0]
        serve6 = load(root, "serve_call6.tgz", "serve")
        serve6["mode"] = serve6["set"].str.extract(r"offline64-(\w+)-")[0]
        http5, http6 = load(root, "http_call5.tgz", "http"), load(root, "http_call6.tgz", "http")
        tput = load(root, "throughput_call6.tgz", "throughput-*")
        tput["mode"] = tput["experiment"].str.extract(r"-(\w+)$")[0]
        s8 = load(root, "seed_8b.tgz", "seed_8b-*")
        s8["mode"] = s8["experiment"].str.extract(r"-(\w+)$")[0]
        table(serve2, ["mode"], "serve offline, call 2 (piecewise and eager alternating, twice; seeds 0-2 each)")
        ratio(serve2, "mode", "piecewise", "eager")
        ratio(serve2, "mode", "eager", "piecewise", "ttft_p95")
        serve6["mode"] = serve6["mode"].fillna("?")
        http6["mode"] = "http"
        both = pd.concat([serve6, http6], ignore_index=True)
        table(both, ["mode"], "serve, call 6: offline piecewise, offline eager, HTTP (piecewise); seeds 0-2 each")
        ratio(both, "mode", "http", "piecewise")
        ratio(both, "mode", "http", "piecewise", "ttft_p95")
        ratio(both, "mode", "piecewise", "eager")
        http5["mode"] = "http"
        table(http5, ["mode"], "serve over HTTP, call 5 (seeds 0-2)")
        table(tput, ["engine", "mode"], "throughput, call 6 (eager sweep, then piecewise; 3 repeats each)")
        ratio(tput, "mode", "piecewise", "eager", within="engine")
        ratio(tput[tput["mode"] == "piecewise"], "engine", "paged", "contiguous")
        table(s8, ["engine", "mode"], "seed_8b, call 5 (piecewise sweep, then eager; 3 repeats each)")
        ratio(s8, "mode", "piecewise", "eager", within="engine")
        ratio(s8[s8["mode"] == "piecewise"], "engine", "paged", "contiguous")
        rep = load(root, "repeat.tgz", "repeat")
        rep["mode"] = rep["set"].str.extract(r"offline64-(\w+)-")[0]
        table(rep, ["mode"], "serve offline, call 10: repeated attention launches (new) against the commit before "
                             "(old), alternating, twice each")
        ratio(rep, "mode", "new", "old")
