"""``harness report RUN_DIR... [--out DIR]``: a Markdown and a self-contained HTML report with figures.

Everything comes from the run directories' tables (harness.results); nothing is typed in by
hand but the vLLM paper's published Fig. 2 bars, drawn beside ours for comparison. The
sweep axis of a figure is whatever the runs' overrides vary besides the engine (the
concurrency, the arrival rate, the block size, the KV budget...); each engine config is
one series. Every figure is captioned with the hardware, the model and the workload.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from harness.kv_breakdown import COMPONENTS  # noqa: E402
from harness.results import RunDir, find_runs, runs_table  # noqa: E402

# Kwon et al., "Efficient Memory Management for Large Language Model Serving with
# PagedAttention", SOSP 2023, Fig. 2: average share of KV cache memory by use (percent).
# The token-state shares are the ones DESIGN.md quotes; the other segments were read off the
# figure and have not been checked against the paper's PDF here.
PAPER_FIG2 = {
    "Orca (Max)": {"token_states": 20.4, "reservation": 13.3, "internal": 57.3, "external": 8.9},
    "Orca (Pow2)": {"token_states": 26.8, "reservation": 17.9, "internal": 13.6, "external": 41.6},
    "Orca (Oracle)": {"token_states": 38.2, "reservation": 25.2, "internal": 0.0, "external": 36.6},
    "vLLM": {"token_states": 96.3, "reservation": 0.0, "internal": 0.0, "external": 3.7},
}
COMPONENT_LABELS = {"token_states": "token states", "reservation": "reservation",
                    "internal": "internal fragmentation", "external": "external fragmentation (& other)"}
COMPONENT_COLORS = {"token_states": "#4c9a2a", "reservation": "#f2b134", "internal": "#d9534f", "external": "#7f5a9e"}
AXIS_NAMES = {"arrival.concurrency": "concurrency (closed-loop clients)", "arrival.rate": "arrival rate (req/s)",
              "engine.block_size": "block size (tokens)", "engine.num_kv_slots": "KV budget (token slots)",
              "engine.kv_budget_gb": "KV budget (GB)", "workload.n": "parallel samples n"}
SUMMARY_COLUMNS = {
    "engine_label": "engine", "status": "status", "output_tok_s": "output tok/s", "total_tok_s": "total tok/s",
    "requests_s": "req/s", "goodput_req_s": "goodput req/s", "ttft_p95": "p95 TTFT s", "tpot_p95": "p95 TPOT s",
    "itl_p95": "p95 ITL s", "e2e_p95": "p95 E2E s", "queue_p95": "p95 queue s", "max_running": "max running",
    "preemptions": "preemptions", "kv_token_states_frac": "KV token states", "kv_waste": "KV waste",
    "kv_fragmentation": "KV fragmentation", "roofline_efficiency": "roofline eff.",
}


@dataclass
class Figure:
    name: str
    title: str
    caption: str

    def file(self, out: Path) -> Path:
        return out / "figures" / f"{self.name}.png"


def sweep_axis(runs: pd.DataFrame) -> str | None:
    """The overridden parameter (besides the engine) that varies across the runs; numeric ones first."""
    params = [c for c in runs.columns if c.startswith("param.") and c != "param.engine" and runs[c].nunique(dropna=True) > 1]
    numeric = [c for c in params if pd.api.types.is_numeric_dtype(runs[c])]
    return (numeric or params or [None])[0]


def axis_name(column: str | None) -> str:
    key = (column or "").removeprefix("param.")
    return AXIS_NAMES.get(key, key)


def caption(runs: pd.DataFrame, x: str | None, what: str) -> str:
    """What the figure shows, on which hardware, model and workload."""
    hardware = ", ".join(sorted(runs["hardware"].dropna().unique()))
    models = ", ".join(sorted(runs["model"].dropna().unique()))
    labels = list(dict.fromkeys(runs["workload_label"].dropna()))
    workload = labels[0] if len(labels) == 1 else f"{labels[0]} (and {len(labels) - 1} more settings)"
    swept = f" Swept: {axis_name(x)} over {', '.join(map(_fmt, sorted(runs[x].dropna().unique())))}." if x else ""
    return f"{what} Hardware: {hardware}. Model: {models}. Workload: {workload}.{swept}"


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def _log_x(ax, values: pd.Series) -> None:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if len(v) and v.min() > 0 and v.max() / v.min() >= 8:
        ax.set_xscale("log", base=2)


def _save(fig, figure: Figure, out: Path) -> Figure:
    figure.file(out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(figure.file(out), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return figure


def fig_metrics_vs_axis(ok: pd.DataFrame, x: str, out: Path) -> Figure:
    """Throughput and p95 latencies against the sweep axis, one line per engine."""
    panels = [("output_tok_s", "output tokens/s"), ("ttft_p95", "p95 TTFT (s)"), ("tpot_p95", "p95 TPOT (s)"),
              ("max_running", "max running requests")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (col, label) in zip(axes, panels):
        for engine, g in ok.sort_values(x).groupby("engine_label"):
            ax.plot(g[x], g[col], marker="o", label=engine)
        ax.set_xlabel(axis_name(x))
        ax.set_ylabel(label)
        _log_x(ax, ok[x])
        if col in ("ttft_p95", "tpot_p95"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    key = x.removeprefix("param.").replace(".", "_")
    figure = Figure(f"throughput_latency_vs_{key}", f"Throughput and p95 latency against {axis_name(x)}",
                    caption(ok, x, f"Output tokens/s, p95 TTFT, p95 TPOT and the most requests running at once, per engine, against {axis_name(x)}."))
    return _save(fig, figure, out)


def fig_latency_vs_throughput(ok: pd.DataFrame, x: str, out: Path) -> Figure:
    """The latency-throughput curve of each engine: each point one setting of the sweep."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (col, label) in zip(axes, [("e2e_p95", "p95 end-to-end latency (s)"), ("ttft_p95", "p95 TTFT (s)")]):
        for engine, g in ok.sort_values(x).groupby("engine_label"):
            ax.plot(g["output_tok_s"], g[col], marker="o", label=engine)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure = Figure("latency_vs_throughput", "Latency against throughput",
                    caption(ok, x, f"Each point is one run; along a line {axis_name(x)} grows."))
    return _save(fig, figure, out)


def fig_distributions(ok: pd.DataFrame, runs: dict[str, RunDir], x: str | None, out: Path) -> Figure:
    """TTFT and TPOT of every request, as box plots per engine over the sweep axis."""
    engines = sorted(ok["engine_label"].unique())
    fig, axes = plt.subplots(2, len(engines), figsize=(max(4.0, 3.6 * len(engines)), 6.4), squeeze=False)
    for j, engine in enumerate(engines):
        g = ok[ok["engine_label"] == engine].sort_values(x) if x else ok[ok["engine_label"] == engine]
        tables = [runs[d].table("requests") for d in g["run_dir"]]
        ticks = [_fmt(v) for v in g[x]] if x else [engine] * len(g)
        for i, metric in enumerate(("ttft_s", "tpot_s")):
            ax = axes[i][j]
            data = [t[metric].dropna().to_numpy() for t in tables]
            ax.boxplot([d if len(d) else [float("nan")] for d in data], showfliers=True, flierprops={"markersize": 2})
            ax.set_xticks(range(1, len(ticks) + 1), ticks, fontsize=7, rotation=45 if len(ticks) > 6 else 0)
            ax.set_yscale("log")
            ax.set_title(f"{engine}: {metric.removesuffix('_s').upper()}", fontsize=9)
            ax.set_ylabel("seconds")
            if x:
                ax.set_xlabel(axis_name(x), fontsize=8)
            ax.grid(alpha=0.3)
    figure = Figure("ttft_tpot_distributions", "TTFT and TPOT distributions",
                    caption(ok, x, "Every request's time to first token and time per output token (boxes: quartiles; whiskers: 1.5 IQR)."))
    return _save(fig, figure, out)


MAX_BARS = 12


def run_label(r: pd.Series, x: str | None) -> str:
    return r["engine_label"] + (f" ({x.removeprefix('param.')}={_fmt(r[x])})" if x else "")


def kv_runs(ok: pd.DataFrame, x: str | None, every_run: bool) -> pd.DataFrame:
    """Runs with KV figures: all of them when few (and asked for), else one per engine config at the largest sweep value."""
    with_kv = ok[ok.get("kv_mean_capacity", pd.Series(0.0, index=ok.index)).fillna(0) > 0]
    with_kv = with_kv[with_kv.get("kv_mean_token_states", pd.Series(0.0, index=with_kv.index)).notna()]
    if x:
        with_kv = with_kv.sort_values(x)
    if every_run and len(with_kv) <= MAX_BARS:
        return with_kv
    return with_kv.groupby("engine_label", sort=True).tail(1)


def fig_runs_bars(ok: pd.DataFrame, x: str | None, out: Path) -> Figure:
    """Throughput and p95 latencies of each run side by side, for sweeps without a numeric axis."""
    panels = [("output_tok_s", "output tokens/s"), ("ttft_p95", "p95 TTFT (s)"), ("tpot_p95", "p95 TPOT (s)"),
              ("max_running", "max running requests")]
    rows = ok.sort_values(["engine_label", x] if x else ["engine_label"])
    labels = [run_label(r, x) for _, r in rows.iterrows()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 1.0 + 0.35 * len(labels)))
    for ax, (col, label) in zip(axes, panels):
        ax.barh(labels, pd.to_numeric(rows[col], errors="coerce").fillna(0.0), color="#4878a8")
        ax.set_xlabel(label)
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
        if ax is not axes[0]:
            ax.set_yticklabels([])
    figure = Figure("throughput_latency_by_run", "Throughput and p95 latency per run",
                    caption(rows, x, "Output tokens/s, p95 TTFT, p95 TPOT and the most requests running at once, per run."))
    return _save(fig, figure, out)


def fig_kv_breakdown(chosen: pd.DataFrame, x: str | None, out: Path) -> Figure:
    """Our KV breakdown as stacked bars (share of the memory in use) beside the paper's Fig. 2."""
    ours = {run_label(r, x): {c: 100 * r[f"kv_{c}_used_frac"] for c in COMPONENTS} for _, r in chosen.iterrows()}
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.9 + 0.55 * max(len(ours), len(PAPER_FIG2))), sharex=True)
    for ax, (title, bars) in zip(axes, [("measured here", ours), ("Kwon et al. 2023, Fig. 2", PAPER_FIG2)]):
        names = list(bars)
        left = [0.0] * len(names)
        for c in COMPONENTS:
            widths = [bars[n][c] for n in names]
            ax.barh(names, widths, left=left, color=COMPONENT_COLORS[c], label=COMPONENT_LABELS[c])
            for k, (w, l) in enumerate(zip(widths, left)):
                if w >= 6:
                    ax.text(l + w / 2, k, f"{w:.1f}", ha="center", va="center", fontsize=7, color="white")
            left = [l + w for l, w in zip(left, widths)]
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("% of KV memory in use")
        ax.invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(COMPONENTS), fontsize=8, frameon=False)
    figure = Figure("kv_breakdown", "KV memory breakdown",
                    caption(chosen, x, "Time-weighted share of the KV memory in use holding token states, reserved for tokens "
                            "still to come, or lost to internal and external fragmentation (DESIGN.md), beside the vLLM "
                            "paper's published breakdown."))
    return _save(fig, figure, out)


def fig_kv_over_time(chosen: pd.DataFrame, runs: dict[str, RunDir], x: str | None, out: Path) -> Figure:
    """KV memory over time as stacked areas, one panel per engine, in % of capacity."""
    fig, axes = plt.subplots(len(chosen), 1, figsize=(9, 2.3 * len(chosen) + 0.6), squeeze=False)
    for ax, (_, r) in zip(axes[:, 0], chosen.iterrows()):
        steps = runs[r["run_dir"]].table("kv_steps")
        steps = steps[steps["capacity"] > 0]
        shares = [100 * steps[c] / steps["capacity"] for c in COMPONENTS]
        ax.stackplot(steps["t_s"], *shares, step="post", colors=[COMPONENT_COLORS[c] for c in COMPONENTS],
                     labels=[COMPONENT_LABELS[c] for c in COMPONENTS])
        top = max((sum(shares)).max() if len(steps) else 0, 1.0)
        ax.set_ylim(0, min(100, 1.15 * top))  # a pool far larger than the workload still shows its split
        ax.set_ylabel("% of capacity")
        ax.set_title(f"{r['engine_label']}" + (f", {axis_name(x)} = {_fmt(r[x])}" if x else ""), fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the first arrival")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    figure = Figure("kv_usage_over_time", "KV usage over time",
                    caption(chosen, x, "KV memory sampled after every engine step, split as in the breakdown."))
    return _save(fig, figure, out)


def fig_block_size(ok: pd.DataFrame, x: str, out: Path) -> Figure:
    """What a block size buys (less internal fragmentation) and costs (throughput, TPOT)."""
    panels = [("output_tok_s", "output tokens/s", 1), ("tpot_p95", "p95 TPOT (s)", 1),
              ("kv_internal_used_frac", "internal fragmentation (% of KV in use)", 100),
              ("kv_token_states_used_frac", "token states (% of KV in use)", 100)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (col, label, scale) in zip(axes, panels):
        for engine, g in ok.sort_values(x).groupby("engine_label"):
            ax.plot(g[x], scale * g[col], marker="o", label=engine)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure = Figure("block_size_tradeoffs", "Block size trade-offs",
                    caption(ok, x, "Throughput, p95 TPOT, internal fragmentation and token states against the paged engine's block size."))
    return _save(fig, figure, out)


def name_series(table: pd.DataFrame) -> pd.DataFrame:
    """Runs of several names under one engine label (``offline64`` and ``offline64_text``, say) would draw as one
    zigzag series: their engine label then carries the run name, ``paged · offline64_text``."""
    if "param.name" not in table or "engine_label" not in table:
        return table
    several = table.groupby("engine_label")["param.name"].transform("nunique") > 1
    table = table.copy()
    table.loc[several, "engine_label"] = table.loc[several, "engine_label"] + " · " + table.loc[several, "param.name"]
    return table


def make_figures(table: pd.DataFrame, runs: dict[str, RunDir], out: Path) -> list[Figure]:
    # a run none of whose requests completed (a server that failed them all) has no figures to draw
    ok = table[(table["status"] == "ok") & (table.get("completed", pd.Series(1, index=table.index)).fillna(0) > 0)]
    if ok.empty:
        return []
    x = sweep_axis(ok)
    figures = []
    if x and pd.api.types.is_numeric_dtype(ok[x]):
        figures.append(fig_metrics_vs_axis(ok, x, out))
        if ok.groupby("engine_label")[x].nunique().max() > 1:
            figures.append(fig_latency_vs_throughput(ok, x, out))
        if x == "param.engine.block_size":
            figures.append(fig_block_size(ok, x, out))
    else:
        figures.append(fig_runs_bars(ok, x, out))
    figures.append(fig_distributions(ok, runs, x, out))
    if not kv_runs(ok, x, every_run=True).empty:
        figures += [fig_kv_breakdown(kv_runs(ok, x, every_run=True), x, out),
                    fig_kv_over_time(kv_runs(ok, x, every_run=False), runs, x, out)]
    return figures


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    x = sweep_axis(table[table["status"] == "ok"]) if (table["status"] == "ok").any() else None
    columns = {"engine_label": "engine", **({x: axis_name(x)} if x else {}),
               **{k: v for k, v in SUMMARY_COLUMNS.items() if k != "engine_label"}}
    shown = table.sort_values(["engine_label", x] if x else ["engine_label"])
    shown = shown[[c for c in columns if c in shown.columns]].rename(columns=columns)
    for c in ("KV token states", "KV waste", "KV fragmentation", "roofline eff."):
        if c in shown:
            shown[c] = shown[c].map(lambda v: f"{100 * v:.1f}%" if isinstance(v, float) and not math.isnan(v) else "")
    return shown.map(_fmt)


def markdown_table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _notes(table: pd.DataFrame, unfinished: list[Path]) -> list[str]:
    notes = []
    for status in ("skipped", "failed"):
        rows = table[table["status"] == status]
        for label, g in rows.groupby("engine_label"):
            notes.append(f"{status}: {label} ({len(g)} runs): {g['reason'].iloc[0]}")
    notes += [f"unfinished (no results): {p}" for p in unfinished]
    capacity = table["kv_mean_capacity"] if "kv_mean_capacity" in table else pd.Series(0.0, index=table.index)
    no_kv = table[(table["status"] == "ok") & ~(capacity.fillna(0) > 0)]
    notes += [f"no KV figures: {label} reports no KV capacity" for label in sorted(no_kv["engine_label"].unique())]
    return notes


def _provenance(runs: list[RunDir]) -> list[str]:
    first = runs[0].metadata
    v = first.get("versions", {})
    git = first.get("git", {})
    shape = first.get("model_shape", {})
    return [
        f"git commit {git.get('commit')}" + (" (uncommitted changes)" if git.get("dirty") else ""),
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"hardware: {first.get('run', {}).get('hardware')}",
        f"model: {first.get('model_dir')} ({shape.get('num_parameters', 0) / 1e6:.1f}M parameters, {shape.get('num_layers')} layers, "
        f"hidden {shape.get('hidden_size')}, {shape.get('num_kv_heads')} KV heads x {shape.get('head_dim')}, {shape.get('dtype')})",
    ]


def write_report(paths: list[Path], out: Path) -> Path:
    """Aggregate the runs under ``paths`` into ``out``: runs.parquet/csv, figures/, report.md and report.html."""
    found, unfinished = find_runs(paths)
    if not found:
        raise FileNotFoundError(f"no finished runs under {', '.join(map(str, paths))}")
    table = name_series(runs_table(found))
    for col in ("reason", "hardware", "model", "workload_label"):
        if col not in table:
            table[col] = None
    out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / "runs.parquet", index=False)
    table.to_csv(out / "runs.csv", index=False)
    figures = make_figures(table, {str(r.path): r for r in found}, out)
    names = ", ".join(sorted(table["experiment"].dropna().unique()))
    title = f"kvbench report: {names}"
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    intro = f"Generated {stamp} by `harness report` from {len(found)} runs in {', '.join(map(str, paths))}."
    summary, notes, provenance = summary_table(table), _notes(table, unfinished), _provenance(found)
    md = [f"# {title}", "", intro, "", "## Runs", "", markdown_table(summary), ""]
    if notes:
        md += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    md += ["## Figures", ""]
    for f in figures:
        md += [f"### {f.title}", "", f"![{f.title}](figures/{f.name}.png)", "", f"*{f.caption}*", ""]
    md += ["## Provenance", "", *[f"- {p}" for p in provenance], ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_html(title, intro, summary, notes, figures, provenance, out))
    return out / "report.md"


def _html(title: str, intro: str, summary: pd.DataFrame, notes: list[str], figures: list[Figure], provenance: list[str], out: Path) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "img{max-width:100%}figcaption{font-style:italic;font-size:13px;margin-bottom:2em}</style></head><body>",
             f"<h1>{esc(title)}</h1><p>{esc(intro)}</p><h2>Runs</h2>", summary.to_html(index=False, border=0)]
    if notes:
        parts += ["<h2>Notes</h2><ul>", *[f"<li>{esc(n)}</li>" for n in notes], "</ul>"]
    parts.append("<h2>Figures</h2>")
    for f in figures:
        data = base64.b64encode(f.file(out).read_bytes()).decode()
        parts.append(f"<figure><h3>{esc(f.title)}</h3><img alt='{esc(f.title)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{esc(f.caption)}</figcaption></figure>")
    parts += ["<h2>Provenance</h2><ul>", *[f"<li>{esc(p)}</li>" for p in provenance], "</ul></body></html>"]
    return "".join(parts)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="harness report", description="Write a report (Markdown, HTML, PNG figures) from run directories.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run or sweep directories (searched recursively)")
    parser.add_argument("--out", type=Path, help="where to write (default: the one RUN_DIR; required with several)")
    args = parser.parse_args(argv)
    missing = [d for d in args.run_dirs if not d.is_dir()]
    if missing:
        print(f"error: {missing[0]} is not a directory", file=sys.stderr)
        return 2
    if args.out is None and len(args.run_dirs) > 1:
        print("error: --out is required with several run directories", file=sys.stderr)
        return 2
    try:
        path = write_report(args.run_dirs, args.out or args.run_dirs[0])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {path.with_suffix('.html')}")
    return 0
