"""The record's figures: medians with 95% bootstrap intervals (harness.bench.stats), and HTTP / offline ratios.

Run from the repo root: ``python experiments/h100-2026-11-26-http/summarize.py``. Call 9's runs come from
``serve_call9.tgz``; call 8's run table did not come back (the device returns 8 files), so its per-run
figures are read from the sweep's log lines (``call8_serve.log``).
"""

from __future__ import annotations

import glob
import re
import tarfile
import tempfile
from pathlib import Path

import pandas as pd

from harness.bench.stats import median_ci, ratio_ci

HERE = Path(__file__).parent
COLUMNS = {"output_tok_s": "{:,.0f}", "gpu_busy_frac": "{:.1%}", "ttft_p95": "{:.3f}", "tpot_p50": "{:.4f}"}


def load(root: Path) -> pd.DataFrame:
    with tarfile.open(HERE / "serve_call9.tgz") as t:
        t.extractall(root, filter="data")
    frames = []
    for f in glob.glob(str(root / "serve" / "**" / "run.parquet"), recursive=True):
        d = pd.read_parquet(f)
        d["setting"] = re.sub(r"-\d+$", "", Path(f).relative_to(root).parts[1])
        frames.append(d)
    return pd.concat(frames, ignore_index=True)


def fmt(est, spec: str) -> str:
    return f"{spec.format(est.value)} [{spec.format(est.low)}-{spec.format(est.high)}]"


def from_log(path: Path) -> dict[str, list[float]]:
    """Per-run output tok/s of each ``### HTTP, SIDE, pass N`` block (and the offline sweep) of a serve.log."""
    runs: dict[str, list[float]] = {}
    side = "offline64"
    for line in path.read_text().splitlines():
        m = re.match(r"### HTTP, (\w+), pass", line)
        if m:
            side = f"http64-{m.group(1)}"
        m = re.search(r"ok in \d+s, ([\d,]+) output tok/s", line)
        if m:
            runs.setdefault(side, []).append(float(m.group(1).replace(",", "")))
    return runs


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        df = load(Path(tmp))
    print("## Call 9: the serve workload (64 closed-loop clients, 512/128, paged), offline and over HTTP\n")
    print("| setting | n | " + " | ".join(COLUMNS) + " |")
    print("| --- | ---: |" + " ---: |" * len(COLUMNS))
    for setting, g in df.groupby("setting"):
        cells = [fmt(median_ci(g[c]), s) if c in g and g[c].notna().any() else "-" for c, s in COLUMNS.items()]
        print(f"| {setting} | {len(g)} | " + " | ".join(cells) + " |")
    offline = df[df.setting == "offline64"]
    print()
    for setting in ("http64-new", "http64-new2"):
        g = df[df.setting == setting]
        r = ratio_ci(g.output_tok_s, offline.output_tok_s)
        t = ratio_ci(g.ttft_p95, offline.ttft_p95)
        print(f"- {setting} / offline: output tok/s {r.value:.3f} [{r.low:.3f}-{r.high:.3f}], "
              f"p95 TTFT {t.value:.2f}x [{t.low:.2f}-{t.high:.2f}]")
    print("\n## Call 8 (from its log): one API process, this tree (new) and the session's start (old)\n")
    runs = from_log(HERE / "call8_serve.log")
    for side, values in runs.items():
        est = median_ci(pd.Series(values))
        print(f"- {side}: n = {len(values)}, {fmt(est, '{:,.0f}')} output tok/s")
    for side in ("http64-new", "http64-old"):
        r = ratio_ci(pd.Series(runs[side]), pd.Series(runs["offline64"]))
        print(f"- {side} / offline: {r.value:.3f} [{r.low:.3f}-{r.high:.3f}]")
