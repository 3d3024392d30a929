"""``harness report RUN_DIR... [--out DIR]``: a Markdown and a self-contained HTML report with figures.

Everything comes from the run directories' tables (harness.bench.results); nothing is typed in by
hand but the vLLM paper's published Fig. 2 bars, drawn beside ours for comparison. The
sweep axis of a figure is whatever the runs' overrides vary besides the engine, the run name
and the repeat or seed (the concurrency, the arrival rate, the block size, the KV budget...);
each engine config is one series. Runs of one series at one setting are repeats: every
figure is their median with a 95% bootstrap interval (harness.bench.stats). Where paged and
contiguous runs share a setting, the report gives their ratio and one statement of what
paging bought and cost. Every figure is captioned with the hardware, the model and the
workload, and names the runs it could not show.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import ScaledTranslation  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from engines.step_clock import HOST_PHASES  # noqa: E402
from harness.bench.kv_breakdown import COMPONENTS  # noqa: E402
from harness.bench.results import RunDir, find_runs, runs_table  # noqa: E402
from harness.bench.schema import SaturationSpec  # noqa: E402
from harness.bench.stats import Estimate, median_ci, ratio_ci  # noqa: E402

# Kwon et al., "Efficient Memory Management for Large Language Model Serving with
# PagedAttention", SOSP 2023, Fig. 2: average share of KV cache memory by use (percent).
# The token-state shares are the ones the paper's text quotes; the other segments were read off
# the figure and have not been checked against the paper's PDF here.
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
              "engine.kv_budget_gb": "KV budget (GB)", "workload.n": "parallel samples n",
              "engine.page_size_kb": "page size (KiB)"}
SUMMARY_COLUMNS = {
    "engine_label": "engine", "status": "status", "output_tok_s": "output tok/s", "total_tok_s": "total tok/s",
    "requests_s": "req/s", "goodput_req_s": "goodput req/s", "ttft_p95": "p95 TTFT s", "tpot_p95": "p95 TPOT s",
    "itl_p95": "p95 ITL s", "e2e_p95": "p95 E2E s", "queue_p95": "p95 queue s", "max_running": "max running",
    "preemptions": "preemptions", "kv_token_states_frac": "KV token states", "kv_waste": "KV waste",
    "kv_fragmentation": "KV fragmentation", "roofline_efficiency": "roofline eff.", "gpu_busy_frac": "GPU busy",
}


PERCENT_COLUMNS = ("kv_token_states_frac", "kv_waste", "kv_fragmentation", "roofline_efficiency", "gpu_busy_frac")
PHASE_COLORS = {"schedule": "#4878a8", "kv": "#d9534f", "map": "#e8938f", "prepare": "#f2b134", "launch": "#7f5a9e", "sync": "#bbbbbb",
                "postprocess": "#4c9a2a"}
ANATOMY_COLUMNS = (*(f"step_{p}_ms" for p in HOST_PHASES), "step_ms", "step_gpu_ms", "in_step_frac")
USED_FRAC_COLUMNS = tuple(f"kv_{c}_used_frac" for c in COMPONENTS)
# what an engine that cannot split its KV memory (kv_breakdown False) leaves NaN
BREAKDOWN_COLUMNS = (*(f"kv_mean_{c}" for c in COMPONENTS), *(f"kv_{c}_frac" for c in COMPONENTS), *USED_FRAC_COLUMNS,
                     "kv_fragmentation", "kv_waste")
NO_BREAKDOWN_ENGINES = ("hf", "hf_paged")  # old runs carry no kv_breakdown column: these never had one
STAT_COLUMNS = tuple(dict.fromkeys([*(c for c in SUMMARY_COLUMNS if c not in ("engine_label", "status")),
                                    *USED_FRAC_COLUMNS, *ANATOMY_COLUMNS]))
RATIO_METRICS = {"output_tok_s": "output tok/s", "tpot_p95": "p95 TPOT", "ttft_p95": "p95 TTFT"}
REPEAT_KEYS = ("repeat", "repeats", "seed")  # overrides that repeat a setting rather than change it
LABEL_KEYS = ("engine", "name")  # overrides that name a series rather than place it on an axis
REPO = Path(__file__).resolve().parents[2]
METHODOLOGY = REPO / "docs" / "methodology.md"
MAX_BARS = 12
MAX_MISSING_SHOWN = 6


@dataclass
class Figure:
    name: str
    title: str
    caption: str

    def file(self, out: Path) -> Path:
        return out / "figures" / f"{self.name}.png"


@dataclass
class Ratio:
    """paged / contiguous at one setting of the sweep (``setting`` None without a sweep axis)."""

    paged: str
    contiguous: str
    setting: object
    n_paged: int
    n_contiguous: int
    metrics: dict[str, Estimate] = field(default_factory=dict)


# --- the run table: old runs' gaps, usable runs, series, the sweep axis --------------------------------------------


def normalize(table: pd.DataFrame) -> pd.DataFrame:
    """``repeat`` 0 where missing; ``kv_breakdown`` inferred where missing (a capacity, not hf or hf_paged, and a
    token-state share); the breakdown columns NaN for runs without one (old hf_paged runs recorded 100% token states)."""
    table = table.copy()
    table["repeat"] = pd.to_numeric(table["repeat"], errors="coerce").fillna(0).astype(int) if "repeat" in table else 0
    capacity = pd.to_numeric(table.get("kv_mean_capacity", pd.Series(0.0, index=table.index)), errors="coerce")
    engine = table.get("engine", pd.Series("", index=table.index))
    inferred = (capacity.fillna(0) > 0) & ~engine.isin(NO_BREAKDOWN_ENGINES)
    if "kv_token_states_used_frac" in table:  # KV usage read from a server's /metrics: a total, no split
        inferred &= pd.to_numeric(table["kv_token_states_used_frac"], errors="coerce").notna()
    given = table["kv_breakdown"] if "kv_breakdown" in table else pd.Series(None, index=table.index, dtype=object)
    table["kv_breakdown"] = [bool(i) if pd.isna(g) else bool(g) for g, i in zip(given, inferred)]
    for c in BREAKDOWN_COLUMNS:
        if c in table:
            table[c] = pd.to_numeric(table[c], errors="coerce").where(table["kv_breakdown"])
    return table


def usable(table: pd.DataFrame) -> pd.Series:
    """Runs with figures to draw: ``ok`` and at least one request completed."""
    completed = pd.to_numeric(table.get("completed", pd.Series(1, index=table.index)), errors="coerce").fillna(0)
    return (table["status"] == "ok") & (completed > 0)


def outcome(table: pd.DataFrame) -> pd.Series:
    """The status, with ``ok`` runs that completed nothing called so."""
    return table["status"].where(usable(table) | (table["status"] != "ok"), "no request completed")


def name_series(table: pd.DataFrame) -> pd.DataFrame:
    """Runs of several names under one engine label (``offline64`` and ``offline64_text``, say) would draw as one
    zigzag series: their engine label then carries the run name, ``paged · offline64_text``."""
    if "param.name" not in table or "engine_label" not in table:
        return table
    several = table.groupby("engine_label")["param.name"].transform("nunique") > 1
    table = table.copy()
    table.loc[several, "engine_label"] = table.loc[several, "engine_label"] + " · " + table.loc[several, "param.name"]
    return table


def _key(column: str) -> str:
    return column.removeprefix("param.")


def varying_params(runs: pd.DataFrame) -> list[str]:
    """Overrides that take several values across ``runs``, besides the engine, the name and the repeat or seed."""
    return [c for c in runs.columns if c.startswith("param.") and _key(c) not in (*LABEL_KEYS, *REPEAT_KEYS)
            and runs[c].nunique(dropna=True) > 1]


def sweep_axis(runs: pd.DataFrame) -> str | None:
    """The overridden parameter that varies across the runs; numeric ones first. Never the repeat or the seed."""
    params = varying_params(runs)
    numeric = [c for c in params if pd.api.types.is_numeric_dtype(runs[c])]
    return (numeric or params or [None])[0]


def fold_params(table: pd.DataFrame, x: str | None) -> pd.DataFrame:
    """Overrides besides the axis that vary within one engine label (a 2-D sweep) join its series label,
    ``paged · block_size=32``, so that runs of different settings are never taken for repeats of one."""
    table = table.copy()
    for c in varying_params(table):
        if c == x:
            continue
        several = table.groupby("engine_label")[c].transform("nunique") > 1
        table.loc[several, "engine_label"] = (table.loc[several, "engine_label"] + f" · {_key(c)}="
                                              + table.loc[several, c].astype(object).map(_fmt))
    return table


def group_keys(x: str | None) -> list[str]:
    return ["engine_label", x] if x else ["engine_label"]


def group_stats(ok: pd.DataFrame, x: str | None) -> pd.DataFrame:
    """One row per (series, setting): the median of each figure over the repeats, with ``_lo``/``_hi`` bounds."""
    rows = []
    for _, g in ok.sort_values("repeat").groupby(group_keys(x), sort=True, dropna=False):
        first = g.iloc[0]
        row = {"engine_label": first["engine_label"], "engine": first.get("engine"), "base_label": first["base_label"],
               "kv_breakdown": bool(g["kv_breakdown"].all()), "n": len(g), "run_dirs": list(g["run_dir"]),
               "repeats": list(g["repeat"])}
        if x:
            row[x] = first[x]
        for c in STAT_COLUMNS:
            e = median_ci(pd.to_numeric(g[c], errors="coerce")) if c in g else Estimate(math.nan)
            row[c], row[f"{c}_lo"], row[f"{c}_hi"] = e.value, e.low, e.high
        rows.append(row)
    return pd.DataFrame(rows)


# --- words and numbers ----------------------------------------------------------------------------------------------


def axis_name(column: str | None) -> str:
    key = _key(column or "")
    return AXIS_NAMES.get(key, key)


def short_axis(column: str | None) -> str:
    """``concurrency`` for ``concurrency (closed-loop clients)``."""
    return axis_name(column).split(" (")[0]


def caption(runs: pd.DataFrame, x: str | None, what: str) -> str:
    """What the figure shows, on which hardware, model and workload."""
    hardware = ", ".join(sorted(runs["hardware"].dropna().unique()))
    models = ", ".join(sorted(runs["model"].dropna().unique()))
    labels = list(dict.fromkeys(runs["workload_label"].dropna()))
    workload = labels[0] if len(labels) == 1 else f"{labels[0]} (and {len(labels) - 1} more settings)"
    swept = f" Swept: {axis_name(x)} over {', '.join(map(_fmt, _sorted_unique(runs[x])))}." if x else ""
    return f"{what} Hardware: {hardware}. Model: {models}. Workload: {workload}.{swept}"


def _sorted_unique(values: pd.Series) -> list:
    unique = list(values.dropna().unique())
    try:
        return sorted(unique)
    except TypeError:
        return sorted(unique, key=str)


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def fmt_estimate(e: Estimate, percent: bool = False) -> str:
    """``16,745 [16,345–18,019]``, ``21.8% [21.5–22.0%]``; the value alone without an interval (or a zero-width one);
    n/a for NaN."""
    if math.isnan(e.value):
        return "n/a"
    num = (lambda v: f"{100 * v:.1f}") if percent else _fmt
    unit = "%" if percent else ""
    if not e.has_interval or e.low == e.high:  # the repeats column tells one run from several equal ones
        return f"{num(e.value)}{unit}"
    return f"{num(e.value)}{unit} [{num(e.low)}–{num(e.high)}{unit}]"


def fmt_ratio(e: Estimate, unit: str = "") -> str:
    """``2.09x [1.67–2.5]`` with ``unit="x"``."""
    if math.isnan(e.value):
        return "n/a"
    text = f"{e.value:.3g}{unit}"
    return f"{text} [{e.low:.3g}–{e.high:.3g}]" if e.has_interval else text


def fmt_cost(e: Estimate) -> str:
    """A ratio below 1 as what it cost: 0.988 [0.98–0.996] is ``1.2% [0.4–2.0%]``."""
    text = f"{100 * (1 - e.value):.1f}%"
    if not e.has_interval:
        return text
    low, high = 100 * (1 - e.high), 100 * (1 - e.low)
    return f"{text} [{low:.1f}% to {high:.1f}%]" if low < 0 else f"{text} [{low:.1f}–{high:.1f}%]"


def _noise(e: Estimate) -> str:
    return " (within noise: the interval includes no change)" if e.contains(1.0) else ""


def run_label(r: pd.Series, x: str | None) -> str:
    return r["engine_label"] + (f", {short_axis(x)} {_fmt(r[x])}" if x else "")


def _last_line(reason) -> str:
    """The line of a reason that says what went wrong (a traceback's last)."""
    lines = str(reason).strip().splitlines() if isinstance(reason, str) else []
    return lines[-1] if lines else ""


def missing_runs(table: pd.DataFrame, x: str | None) -> list[str]:
    """The runs no figure can show, by outcome, series and reason: ``failed: contiguous at concurrency 256 (OOM)``."""
    bad = table[~usable(table)].assign(_outcome=outcome(table), _reason=table["reason"].fillna("").astype(str))
    saturated = (bad["_outcome"] == "skipped") & bad["_reason"].str.startswith("saturated")
    lines = []
    if saturated.any():  # by design (saturation.skip_factor): one line, not one per series and repeat
        lines.append(f"{int(saturated.sum())} runs skipped as saturated: a lower {short_axis(x) if x else 'value'} of "
                     "their series and repeat had already exploded")
    for (what, label, reason), g in bad[~saturated].groupby(["_outcome", "engine_label", "_reason"], sort=True):
        where = f" at {short_axis(x)} {', '.join(map(_fmt, _sorted_unique(g[x])))}" if x and g[x].notna().any() else ""
        repeats = f", repeat {', '.join(map(str, sorted(set(g['repeat']))))}" if (table["repeat"] > 0).any() else ""
        reason = _last_line(reason)[:80]
        lines.append(f"{what}: {label}{where}{repeats}" + (f" ({reason})" if reason else ""))
    return lines


# --- paged against contiguous -------------------------------------------------------------------------------------


def paging_ratios(ok: pd.DataFrame, x: str | None, kinds: tuple[str, str] = ("paged", "contiguous")) -> list[Ratio]:
    """paged / contiguous (or another pair of engine ``kinds``) of each figure in RATIO_METRICS, for every pair of
    such series at every shared setting. Series pair up when they carry the same run name or other settings
    (``paged · offline64`` with ``contiguous · offline64``) and were measured the same way (``paged@http`` only with
    ``contiguous@http``)."""
    suffix = {label: (base.partition("@")[2], label[len(base):])
              for label, base in zip(ok["engine_label"], ok["base_label"])}
    series = [sorted(ok.loc[ok["engine"] == kind, "engine_label"].unique()) for kind in kinds]
    settings = _sorted_unique(ok[x]) if x else [None]
    ratios = []
    for p in series[0]:
        for c in series[1]:
            if suffix[p] != suffix[c]:
                continue
            for v in settings:
                a, b = _at(ok, p, x, v), _at(ok, c, x, v)
                if len(a) and len(b):
                    metrics = {m: ratio_ci(a[m], b[m]) for m in RATIO_METRICS if m in ok}
                    ratios.append(Ratio(p, c, v, len(a), len(b), metrics))
    return ratios


def _at(ok: pd.DataFrame, label: str, x: str | None, value) -> pd.DataFrame:
    rows = ok[ok["engine_label"] == label]
    return rows[rows[x] == value] if x else rows


def ratio_table(ratios: list[Ratio], x: str | None, first: str = "paged") -> pd.DataFrame:
    rows = []
    for r in ratios:
        row = {first: r.paged, "against": r.contiguous, **({axis_name(x): _fmt(r.setting)} if x else {}),
               "repeats": f"{r.n_paged} / {r.n_contiguous}"}
        row.update({f"{name} ratio": fmt_ratio(r.metrics.get(m, Estimate(math.nan))) for m, name in RATIO_METRICS.items()})
        rows.append(row)
    return pd.DataFrame(rows)


VIRTUAL_NOTE = ("Virtual-contiguous KV (vAttention: contiguous addresses, physical pages mapped on demand) / each "
                "other strategy, of the medians at each setting, with 95% bootstrap intervals (each group resampled "
                "alone).")


def virtual_section(ok: pd.DataFrame, x: str | None) -> object | None:
    """vattention / contiguous and vattention / paged, when the runs have vattention and either."""
    from harness.bench import paper  # it draws with this module's helpers

    ratios = paging_ratios(ok, x, ("vattention", "contiguous")) + paging_ratios(ok, x, ("vattention", "paged"))
    if not ratios:
        return None
    return paper.Section("Virtual-contiguous against contiguous and paged", [VIRTUAL_NOTE],
                         [("vattention / the others", ratio_table(ratios, x, first="vattention"))])


def paging_statement(ok: pd.DataFrame, ratios: list[Ratio], x: str | None) -> str:
    """What paging bought and cost in output tokens/s: its largest gain and its largest cost across the sweep,
    each against the strongest contiguous policy at that setting (the one with the most output tokens/s)."""
    kinds = set(ok.get("engine", pd.Series(dtype=object)))
    if "paged" not in kinds or "contiguous" not in kinds:
        return f"Paging: no {'paged' if 'paged' not in kinds else 'contiguous'} run to compare."
    ratios = [r for r in ratios if not math.isnan(r.metrics.get("output_tok_s", Estimate(math.nan)).value)]
    if not ratios:
        return "Paging: the paged and contiguous runs share no setting to compare."
    paged = "paged" if any(r.paged == "paged" for r in ratios) else ratios[0].paged
    strongest: dict[object, Ratio] = {}
    for r in (r for r in ratios if r.paged == paged):
        if r.setting not in strongest or r.metrics["output_tok_s"].value < strongest[r.setting].metrics["output_tok_s"].value:
            strongest[r.setting] = r
    chosen = list(strongest.values())
    gain = max(chosen, key=lambda r: r.metrics["output_tok_s"].value)
    cost = min(chosen, key=lambda r: r.metrics["output_tok_s"].value)
    policies = {r.contiguous: _policy(ok, r.contiguous) for r in ratios}
    return " ".join(s for s in [_throughput_sentence(paged, gain, cost, x, policies, several=len(chosen) > 1),
                                _weakest_sentence(paged, ratios, gain, x, policies),
                                _latency_sentence(chosen, x), _basis(chosen)] if s)


def _weakest_sentence(paged: str, ratios: list[Ratio], gain: Ratio, x: str | None, policies: dict[str, str]) -> str:
    """The largest gain against any contiguous policy, when that is not the gain already stated: what paging buys
    over the reservation a contiguous cache must make without knowing the output length."""
    best = max((r for r in ratios if r.paged == paged), key=lambda r: r.metrics["output_tok_s"].value)
    g = best.metrics["output_tok_s"]
    if g.value <= 1 or (best.contiguous == gain.contiguous and best.setting == gain.setting):
        return ""
    return (f"Against every contiguous policy, its largest gain was {fmt_ratio(g, 'x')}{_noise(g)} the output "
            f"tokens/s of {policies[best.contiguous]} {_where(best, x)}".rstrip() + ".")


def _policy(ok: pd.DataFrame, label: str) -> str:
    """``contiguous (max reservation)`` where the runs record their reservation policy."""
    if "engine.reservation" not in ok:
        return label
    policies = ok.loc[ok["engine_label"] == label, "engine.reservation"].dropna().unique()
    return f"{label} ({policies[0]} reservation)" if len(policies) == 1 else label


def _where(r: Ratio, x: str | None) -> str:
    return f"at {short_axis(x)} {_fmt(r.setting)}" if x else ""


def _throughput_sentence(paged: str, gain: Ratio, cost: Ratio, x: str | None, policies: dict[str, str],
                         several: bool) -> str:
    """The largest gain and the largest cost; across ``several`` settings, also that there was none of either."""
    g, c = gain.metrics["output_tok_s"], cost.metrics["output_tok_s"]
    clauses = []
    if g.value >= 1:
        clauses.append(f"{_where(gain, x)}, {paged} gave {fmt_ratio(g, 'x')}{_noise(g)} the output tokens/s of "
                       f"{policies[gain.contiguous]}".removeprefix(", "))
    elif several:
        clauses.append(f"{paged} gave no more output tokens/s than the strongest contiguous policy at any {short_axis(x)}")
    if c.value < 1:
        subject = "it" if clauses else paged
        against = "" if g.value >= 1 and cost.contiguous == gain.contiguous else \
            f" of the output tokens/s of {policies[cost.contiguous]}"
        clauses.append(f"{_where(cost, x)} {subject} cost {fmt_cost(c)}{_noise(c)}{against}".strip())
    elif several:
        clauses.append(f"it cost no output tokens/s at any {short_axis(x)} (smallest gain: {fmt_ratio(c, 'x')} "
                       f"{_where(cost, x)} against {policies[cost.contiguous]})")
    text = "; ".join(clauses)
    return text[0].upper() + text[1:] + "."


def _latency_sentence(chosen: list[Ratio], x: str | None) -> str:
    """The range of paged/contiguous p95 TPOT and TTFT over the settings (the ratio table has their intervals)."""
    parts = []
    for m, name in (("tpot_p95", "p95 TPOT"), ("ttft_p95", "p95 TTFT")):
        rs = [r for r in chosen if m in r.metrics and not math.isnan(r.metrics[m].value)]
        if not rs:
            continue
        lo = min(rs, key=lambda r: r.metrics[m].value)
        hi = max(rs, key=lambda r: r.metrics[m].value)
        if lo is hi:
            parts.append(f"{name} was {fmt_ratio(lo.metrics[m], 'x')}")
        else:
            parts.append(f"{name} ranged from {fmt_ratio(lo.metrics[m], 'x')} ({_where(lo, x).removeprefix('at ')}) "
                         f"to {fmt_ratio(hi.metrics[m], 'x')} ({_where(hi, x).removeprefix('at ')})")
    return f"Paged/contiguous {', '.join(parts)}." if parts else ""


def _basis(chosen: list[Ratio]) -> str:
    n_p = sorted({r.n_paged for r in chosen})
    n_c = sorted({r.n_contiguous for r in chosen})
    if n_p == [1] and n_c == [1]:
        return "(One run each: no interval; each setting against its contiguous policy with the most output tokens/s.)"
    span = lambda ns: str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"  # noqa: E731
    return (f"(Medians over {span(n_p)} paged and {span(n_c)} contiguous repeats, 95% bootstrap intervals; each setting "
            "against its contiguous policy with the most output tokens/s.)")


# --- figures --------------------------------------------------------------------------------------------------------


def _log_x(ax, values: pd.Series) -> None:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if len(v) and v.min() > 0 and v.max() / v.min() >= 8:
        ax.set_xscale("log", base=2)


def _colors(labels) -> dict[str, str]:
    """One colour per series, the same in every figure."""
    return {label: f"C{i % 10}" for i, label in enumerate(sorted(set(labels)))}


def _bounds(g: pd.DataFrame, col: str, scale: float = 1.0) -> tuple[pd.Series, list]:
    """The medians and the error-bar lengths below and above them (NaN, so no bar is drawn, without an interval)."""
    y = scale * g[col].astype(float)
    below = (y - scale * g[f"{col}_lo"].astype(float)).clip(lower=0)
    above = (scale * g[f"{col}_hi"].astype(float) - y).clip(lower=0)
    return y, [below.to_numpy(), above.to_numpy()]


def _name_missing(fig, missing: list[str], below_inches: float = 0.0) -> None:
    """A line under the figure (and ``below_inches`` under what is already below it, a legend) naming the runs it
    cannot show (failed, skipped, nothing completed)."""
    if not missing:
        return
    shown = missing[:MAX_MISSING_SHOWN] + ([f"and {len(missing) - MAX_MISSING_SHOWN} more"]
                                           if len(missing) > MAX_MISSING_SHOWN else [])
    y = -0.01 - below_inches / fig.get_figheight()
    fig.text(0.01, y, "Not shown: " + "; ".join(shown), ha="left", va="top", fontsize=8, color="#a01818",
             wrap=True, transform=fig.transFigure)


def _missing_caption(missing: list[str]) -> str:
    return f" Not shown: {'; '.join(missing)}." if missing else ""


def _save(fig, figure: Figure, out: Path, missing: list[str], below_inches: float = 0.0) -> Figure:
    figure.file(out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    _name_missing(fig, missing, below_inches)
    fig.savefig(figure.file(out), dpi=110, bbox_inches="tight")
    plt.close(fig)
    figure.caption += _missing_caption(missing)
    return figure


REPEATS_NOTE = "Points: medians over the repeats; bars: 95% bootstrap intervals (none for a single run)."


def fig_metrics_vs_axis(stats: pd.DataFrame, ok: pd.DataFrame, x: str, out: Path, missing: list[str]) -> Figure:
    """Throughput and p95 latencies against the sweep axis, one line per engine, with intervals."""
    panels = [("output_tok_s", "output tokens/s"), ("ttft_p95", "p95 TTFT (s)"), ("tpot_p95", "p95 TPOT (s)"),
              ("max_running", "max running requests")]
    colors = _colors(stats["engine_label"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (col, label) in zip(axes, panels):
        for engine, g in stats.sort_values(x).groupby("engine_label"):
            y, err = _bounds(g, col)
            ax.errorbar(g[x], y, yerr=err, marker="o", capsize=3, color=colors[engine], label=engine)
        ax.set_xlabel(axis_name(x))
        ax.set_ylabel(label)
        _log_x(ax, stats[x])
        if col in ("ttft_p95", "tpot_p95"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    key = _key(x).replace(".", "_")
    figure = Figure(f"throughput_latency_vs_{key}", f"Throughput and p95 latency against {axis_name(x)}",
                    caption(ok, x, f"Output tokens/s, p95 TTFT, p95 TPOT and the most requests running at once, per "
                            f"engine, against {axis_name(x)}. {REPEATS_NOTE}"))
    return _save(fig, figure, out, missing)


def fig_latency_vs_throughput(stats: pd.DataFrame, ok: pd.DataFrame, x: str, out: Path, missing: list[str]) -> Figure:
    """The latency-throughput curve of each engine: medians joined in order of the load, each labelled with its value."""
    colors = _colors(stats["engine_label"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (col, label) in zip(axes, [("e2e_p95", "p95 end-to-end latency (s)"), ("ttft_p95", "p95 TTFT (s)")]):
        for engine, g in stats.groupby("engine_label"):
            g = g.sort_values(x)
            tput, xerr = _bounds(g, "output_tok_s")
            lat, yerr = _bounds(g, col)
            ax.errorbar(tput, lat, xerr=xerr, yerr=yerr, marker="o", capsize=2, color=colors[engine], label=engine)
            for px, py, v in zip(tput, lat, g[x]):
                ax.annotate(_fmt(v), (px, py), xytext=(4, 3), textcoords="offset points", fontsize=7,
                            color=colors[engine])
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure = Figure("latency_vs_throughput", "Latency against throughput",
                    caption(ok, x, f"Each point is one setting of {short_axis(x)} (its value beside it); an engine's points "
                            f"are joined in order of {short_axis(x)}. Medians over the repeats; bars: 95% bootstrap "
                            "intervals in both directions."))
    return _save(fig, figure, out, missing)


def _requests(runs: dict[str, RunDir], run_dirs: list[str]) -> pd.DataFrame:
    """The successful requests of some runs, pooled."""
    tables = [runs[d].table("requests") for d in run_dirs]
    tables = [t[t["error"].isna()] if "error" in t else t for t in tables]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def fig_distributions(stats: pd.DataFrame, ok: pd.DataFrame, runs: dict[str, RunDir], x: str | None, out: Path,
                      missing: list[str]) -> Figure:
    """TTFT and TPOT of every request as box plots per engine over the sweep axis, one y-scale per row."""
    engines = sorted(stats["engine_label"].unique())
    fig, axes = plt.subplots(2, len(engines), figsize=(max(4.0, 3.6 * len(engines)), 6.4), squeeze=False, sharey="row")
    for j, engine in enumerate(engines):
        g = stats[stats["engine_label"] == engine]
        g = g.sort_values(x) if x else g
        pooled = [_requests(runs, dirs) for dirs in g["run_dirs"]]
        ticks = [_fmt(v) for v in g[x]] if x else [engine] * len(g)
        for i, metric in enumerate(("ttft_s", "tpot_s")):
            ax = axes[i][j]
            data = [t[metric].dropna().to_numpy() if metric in t else [] for t in pooled]
            ax.boxplot([d if len(d) else [float("nan")] for d in data], showfliers=True, flierprops={"markersize": 2})
            ax.set_xticks(range(1, len(ticks) + 1), ticks, fontsize=7, rotation=45 if len(ticks) > 6 else 0)
            ax.set_yscale("log")
            ax.set_title(f"{engine}: {metric.removesuffix('_s').upper()}", fontsize=9)
            if j == 0:
                ax.set_ylabel("seconds")
            if x:
                ax.set_xlabel(axis_name(x), fontsize=8)
            ax.grid(alpha=0.3)
    figure = Figure("ttft_tpot_distributions", "TTFT and TPOT distributions",
                    caption(ok, x, "Every successful request's time to first token and time per output token, pooled "
                            "over the repeats of each setting (boxes: quartiles; whiskers: 1.5 IQR). The engines of a "
                            "row share one y-scale."))
    return _save(fig, figure, out, missing)


def fig_runs_bars(stats: pd.DataFrame, ok: pd.DataFrame, x: str | None, out: Path, missing: list[str]) -> Figure:
    """Throughput and p95 latencies of each series side by side, for sweeps without a numeric axis."""
    panels = [("output_tok_s", "output tokens/s"), ("ttft_p95", "p95 TTFT (s)"), ("tpot_p95", "p95 TPOT (s)"),
              ("max_running", "max running requests")]
    rows = stats.sort_values(group_keys(x))
    labels = [f"{run_label(r, x)} (n={r['n']})" for _, r in rows.iterrows()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 1.0 + 0.35 * len(labels)))
    for ax, (col, label) in zip(axes, panels):
        y, err = _bounds(rows, col)
        ax.barh(labels, y.fillna(0.0), xerr=err, color="#4878a8", capsize=3, error_kw={"elinewidth": 1})
        ax.set_xlabel(label)
        ax.locator_params(axis="x", nbins=4)  # small latencies' long tick labels would run together
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
        if ax is not axes[0]:
            ax.set_yticklabels([])
    figure = Figure("throughput_latency_by_run", "Throughput and p95 latency per engine",
                    caption(ok, x, "Output tokens/s, p95 TTFT, p95 TPOT and the most requests running at once, per "
                            "engine (n: repeats). Bars: medians over the repeats; whiskers: 95% bootstrap intervals."))
    return _save(fig, figure, out, missing)


def kv_groups(stats: pd.DataFrame, x: str | None, every: bool) -> pd.DataFrame:
    """Groups with KV figures: all when few (and asked for), else one per series at its largest sweep value."""
    chosen = stats.sort_values([x, "engine_label"], kind="stable") if x else stats
    if every and len(chosen) <= MAX_BARS:
        return chosen
    return chosen.groupby("engine_label", sort=True).tail(1)


def _breakdown_shares(r: pd.Series) -> tuple[dict[str, float], tuple[float, float, float]]:
    """The medians of the four shares, rescaled to 100%, and the token-state share's median and bounds, alike."""
    medians = {c: 100 * float(r[f"kv_{c}_used_frac"]) for c in COMPONENTS}
    total = sum(v for v in medians.values() if not math.isnan(v))
    scale = 100 / total if total > 0 else 1.0
    ts = tuple(scale * 100 * float(r[f"kv_token_states_used_frac{s}"]) for s in ("", "_lo", "_hi"))
    return {c: scale * v for c, v in medians.items()}, ts


def fig_kv_breakdown(chosen: pd.DataFrame, ok: pd.DataFrame, x: str | None, out: Path, missing: list[str]) -> Figure:
    """Our KV breakdown as stacked bars (share of the memory in use) beside the paper's Fig. 2; n/a where unmeasured."""
    names = [f"{run_label(r, x)} (n={r['n']})" for _, r in chosen.iterrows()]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.9 + 0.55 * max(len(names), len(PAPER_FIG2))), sharex=True)
    ax = axes[0]
    for k, (name, (_, r)) in enumerate(zip(names, chosen.iterrows())):
        if not r["kv_breakdown"]:
            ax.barh(name, 100, color="none", edgecolor="#999999", hatch="//")
            ax.text(50, k, f"n/a: {r['engine']} reports no KV breakdown", ha="center", va="center", fontsize=8,
                    color="#333333", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
            continue
        shares, (ts, lo, hi) = _breakdown_shares(r)
        _stacked_bar(ax, k, name, shares)
        if not (math.isnan(lo) or math.isnan(hi)):
            ax.errorbar(ts, k, xerr=[[max(ts - lo, 0)], [max(hi - ts, 0)]], fmt="none", ecolor="black", capsize=3)
    for k, name in enumerate(PAPER_FIG2):
        _stacked_bar(axes[1], k, name, PAPER_FIG2[name])
    for a, title in zip(axes, ("measured here", "Kwon et al. 2023, Fig. 2")):
        a.set_title(title, fontsize=10)
        a.set_xlabel("% of KV memory in use")
        a.set_xlim(0, 100)
        a.invert_yaxis()
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(COMPONENTS), fontsize=8, frameon=False)
    figure = Figure("kv_breakdown", "KV memory breakdown",
                    caption(ok, x, "Time-weighted share of the KV memory in use holding token states, reserved for tokens "
                            "still to come, or lost to internal and external fragmentation (defined in the methodology), "
                            "beside the vLLM paper's published breakdown. Bars: the median share over the repeats (n), "
                            "rescaled to 100%; whisker: 95% bootstrap interval of the token-state share. n/a: the engine "
                            "cannot split its KV memory."))
    return _save(fig, figure, out, missing, below_inches=0.35)  # under the legend


def _stacked_bar(ax, k: int, name: str, shares: dict[str, float]) -> None:
    left = 0.0
    for c in COMPONENTS:
        w = shares.get(c, 0.0)
        w = 0.0 if math.isnan(w) else w
        ax.barh(name, w, left=left, color=COMPONENT_COLORS[c], label=COMPONENT_LABELS[c] if k == 0 else None)
        if w >= 6:
            ax.text(left + w / 2, k, f"{w:.1f}", ha="center", va="center", fontsize=7, color="white")
        left += w


def fig_kv_over_time(chosen: pd.DataFrame, ok: pd.DataFrame, runs: dict[str, RunDir], x: str | None, out: Path,
                     missing: list[str]) -> Figure:
    """KV memory over time as stacked areas, one panel per engine (its first repeat), in % of capacity."""
    fig, axes = plt.subplots(len(chosen), 1, figsize=(9, 2.3 * len(chosen) + 0.6), squeeze=False)
    for ax, (_, r) in zip(axes[:, 0], chosen.iterrows()):
        steps = runs[r["run_dirs"][0]].table("kv_steps")
        steps = steps[steps["capacity"] > 0] if "capacity" in steps else steps.iloc[0:0]
        if r["kv_breakdown"]:
            _kv_areas(ax, steps)
        else:
            _kv_no_breakdown(ax, steps, r["engine"])
        where = f", {axis_name(x)} = {_fmt(r[x])}" if x else ""
        repeat = f" (repeat {r['repeats'][0]} of {r['n']})" if r["n"] > 1 else ""
        ax.set_title(f"{r['engine_label']}{where}{repeat}", fontsize=9)
        ax.set_ylabel("% of capacity")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the first arrival")
    for ax in axes[:, 0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
            break
    figure = Figure("kv_usage_over_time", "KV usage over time",
                    caption(ok, x, "KV memory sampled after every engine step, split as in the breakdown; one run per "
                            "engine (its first repeat), as a trace over time has no median."))
    return _save(fig, figure, out, missing)


def _kv_areas(ax, steps: pd.DataFrame) -> None:
    shares = [100 * steps[c] / steps["capacity"] for c in COMPONENTS]
    ax.stackplot(steps["t_s"], *shares, step="post", colors=[COMPONENT_COLORS[c] for c in COMPONENTS],
                 labels=[COMPONENT_LABELS[c] for c in COMPONENTS])
    top = max((sum(shares)).max() if len(steps) else 0, 1.0)
    ax.set_ylim(0, min(100, 1.15 * top))  # a pool far larger than the workload still shows its split


def _kv_no_breakdown(ax, steps: pd.DataFrame, engine: str) -> None:
    """Only the token states (known from the requests' lengths) as a line; the rest of the split is n/a."""
    if len(steps) and "token_states" in steps and steps["token_states"].notna().any():
        share = 100 * steps["token_states"] / steps["capacity"]
        ax.plot(steps["t_s"], share, drawstyle="steps-post", color=COMPONENT_COLORS["token_states"], lw=1,
                label="token states (no split of the rest)")
        ax.set_ylim(0, min(100, 1.15 * max(share.max(), 1.0)))
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.set_ylim(0, 100)
    ax.text(0.5, 0.5, f"n/a: {engine} reports no KV breakdown", transform=ax.transAxes, ha="center",
            va="center", fontsize=9, color="#333333", bbox={"facecolor": "white", "edgecolor": "#999999"})


def fig_block_size(stats: pd.DataFrame, ok: pd.DataFrame, x: str, out: Path, missing: list[str]) -> Figure:
    """What a block size buys (less internal fragmentation) and costs (throughput, TPOT)."""
    panels = [("output_tok_s", "output tokens/s", 1), ("tpot_p95", "p95 TPOT (s)", 1),
              ("kv_internal_used_frac", "internal fragmentation (% of KV in use)", 100),
              ("kv_token_states_used_frac", "token states (% of KV in use)", 100)]
    colors = _colors(stats["engine_label"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (col, label, scale) in zip(axes, panels):
        for engine, g in stats.sort_values(x).groupby("engine_label"):
            y, err = _bounds(g, col, scale)
            ax.errorbar(g[x], y, yerr=err, marker="o", capsize=3, color=colors[engine], label=engine)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure = Figure("block_size_tradeoffs", "Block size trade-offs",
                    caption(ok, x, "Throughput, p95 TPOT, internal fragmentation and token states against the paged "
                            f"engine's block size. {REPEATS_NOTE}"))
    return _save(fig, figure, out, missing)


def fig_step_anatomy(chosen: pd.DataFrame, ok: pd.DataFrame, x: str | None, out: Path, missing: list[str]) -> Figure:
    """Where a step's time goes, per engine: host phases stacked (ms per step), the GPU's time per step beside them."""
    names = [f"{run_label(r, x)} (n={r['n']})" for _, r in chosen.iterrows()]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.5 * len(names)))
    for k, (name, (_, r)) in enumerate(zip(names, chosen.iterrows())):
        left = 0.0
        for p in HOST_PHASES:
            w = float(r[f"step_{p}_ms"])
            w = 0.0 if math.isnan(w) else w
            ax.barh(k, w, left=left, height=0.55, color=PHASE_COLORS[p], label=p if k == 0 else None)
            left += w
        gpu = float(r["step_gpu_ms"])
        if not math.isnan(gpu):
            ax.plot([gpu, gpu], [k - 0.38, k + 0.38], color="black", lw=2, label="GPU time (forward + sampler)" if k == 0 else None)
        busy, inside = r.get("gpu_busy_frac", math.nan), r.get("in_step_frac", math.nan)
        note = (f"  {r['step_ms']:.3g} ms/step" + ("" if math.isnan(busy) else f", GPU busy {100 * busy:.0f}%")
                + ("" if math.isnan(inside) else f", in steps {100 * inside:.0f}%"))
        ax.text(max(left, 0 if math.isnan(gpu) else gpu), k, note, va="center", fontsize=7)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("ms per engine step (medians over the repeats)")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    ax.set_xlim(0, 1.6 * max(1e-3, float(np.nanmax(chosen[["step_ms", "step_gpu_ms"]].to_numpy(dtype=float)))))
    # Below the tick labels and the axis label at a fixed distance in inches: a fraction of the axes' height put
    # a one-engine figure's legend over its axis label.
    below = ScaledTranslation(0, -0.42, fig.dpi_scale_trans)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=ax.transAxes + below,
              ncol=len(HOST_PHASES) + 1, frameon=False)
    figure = Figure("step_anatomy", "Where a step's time goes",
                    caption(ok, x, "Mean host wall time of an engine step split by phase (schedule, KV manager calls, "
                            "preparing inputs, launching the forward and sampler, waiting for the sampled tokens, "
                            "postprocessing; defined in the methodology, \"Step anatomy\"), and the GPU's time per "
                            "step (black mark; on a CPU, the wall time of the same spans). Medians over the repeats (n) "
                            "of each run's mean, so the bars' sum may differ a little from the median step time "
                            "printed beside them, with the GPU's busy share of the run and the share of the run spent "
                            "inside steps. Engines that do not time their steps are left out."))
    return _save(fig, figure, out, missing, below_inches=0.3)


def make_figures(table: pd.DataFrame, runs: dict[str, RunDir], x: str | None, out: Path) -> list[Figure]:
    ok = table[usable(table)]
    if ok.empty:
        return []
    stats = group_stats(ok, x)
    missing = missing_runs(table, x)
    figures = []
    if x and pd.api.types.is_numeric_dtype(ok[x]):
        figures.append(fig_metrics_vs_axis(stats, ok, x, out, missing))
        if stats.groupby("engine_label")[x].nunique().max() > 1:
            figures.append(fig_latency_vs_throughput(stats, ok, x, out, missing))
        if x == "param.engine.block_size":
            figures.append(fig_block_size(stats, ok, x, out, missing))
    else:
        figures.append(fig_runs_bars(stats, ok, x, out, missing))
    if any((Path(d) / "requests.parquet").is_file() for d in ok["run_dir"]):  # a record kept without its request tables
        figures.append(fig_distributions(stats, ok, runs, x, out, missing))
    if stats["kv_breakdown"].any():
        figures.append(fig_kv_breakdown(kv_groups(stats, x, every=True), ok, x, out, missing))
        traced = kv_groups(stats, x, every=False)
        if all((Path(r["run_dirs"][0]) / "kv_steps.parquet").is_file() for _, r in traced.iterrows()):
            figures.append(fig_kv_over_time(traced, ok, runs, x, out, missing))
    timed = kv_groups(stats[stats["step_ms"].notna()], x, every=True)
    if len(timed):
        figures.append(fig_step_anatomy(timed, ok, x, out, missing))
    return figures


# --- tables and the report ------------------------------------------------------------------------------------------


def _status_text(g: pd.DataFrame) -> str:
    counts = outcome(g).value_counts()
    if list(counts.index) == ["ok"]:
        return "ok"
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items(), key=lambda kv: kv[0] != "ok"))


def _cell(ok: pd.DataFrame, col: str) -> str:
    if ok.empty:
        return ""
    # n/a where NaN: normalize() blanked the breakdown of engines without one
    return fmt_estimate(median_ci(pd.to_numeric(ok[col], errors="coerce")), percent=col in PERCENT_COLUMNS)


def summary_table(table: pd.DataFrame, x: str | None) -> pd.DataFrame:
    """One row per (series, setting): the repeats that count, their outcomes, and each headline figure as the
    median with its 95% interval (n/a where the engine does not measure it)."""
    rows = []
    for _, g in table.groupby(group_keys(x), sort=True, dropna=False):
        ok = g[usable(g)]
        row = {"engine": g["engine_label"].iloc[0], **({axis_name(x): _fmt(g[x].iloc[0])} if x else {}),
               "repeats": len(ok), "status": _status_text(g)}
        for col, name in SUMMARY_COLUMNS.items():
            if col not in ("engine_label", "status") and col in table:
                row[name] = _cell(ok, col)
        rows.append(row)
    return pd.DataFrame(rows).astype(str)


def markdown_table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _notes(table: pd.DataFrame, unfinished: list[Path]) -> list[str]:
    notes = []
    for status in ("skipped", "failed"):
        rows = table[table["status"] == status]
        for label, g in rows.groupby("engine_label"):
            notes.append(f"{status}: {label} ({len(g)} runs): {_last_line(g['reason'].iloc[0])}")
    empty = table[outcome(table) == "no request completed"]
    notes += [f"no request completed: {label} ({len(g)} runs)" for label, g in empty.groupby("engine_label")]
    notes += [f"unfinished (no results): {p}" for p in unfinished]
    no_kv = table[usable(table) & ~table["kv_breakdown"]]
    notes += [f"no KV breakdown: {label} reports none (n/a in the tables and figures)"
              for label in sorted(no_kv["engine_label"].unique())]
    if "param.seed" in table and table["param.seed"].nunique(dropna=True) > 1:
        notes.append("runs that differ only in their seed are taken as repeats of one setting")
    return notes


def methodology_link(out: Path) -> str:
    """docs/methodology.md relative to a report inside the repository, else its path."""
    out = out.resolve()
    if out == REPO or REPO in out.parents:
        return Path(os.path.relpath(METHODOLOGY, out)).as_posix()
    return str(METHODOLOGY)


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




@dataclass
class Report:
    """What report.md and report.html both say."""

    title: str
    intro: str
    methodology: str
    statement: str
    summary: pd.DataFrame
    ratios: pd.DataFrame
    notes: list[str]
    figures: list[Figure]
    provenance: list[str]
    sections: list = field(default_factory=list)  # harness.bench.paper.Section: a comparison with a paper's figures


SUMMARY_NOTE = ("Each figure: the median over the repeats that completed, with its 95% percentile-bootstrap interval "
                "in brackets (none for a single run; with 3 repeats it is their range, which holds the true median only 75% of the "
                "time); n/a: not measured by that engine.")
RATIO_NOTE = "paged / contiguous of the medians at each setting, with 95% bootstrap intervals (each group resampled alone)."


def sustain_factor(runs: list[RunDir]) -> float:
    """The sustainable-rate rule's factor the runs were configured with (harness.bench.sustain), else the default."""
    for r in runs:
        value = r.metadata.get("config", {}).get("saturation", {}).get("sustain_factor")
        if value is not None:
            return float(value)
    return SaturationSpec().sustain_factor


def write_report(paths: list[Path], out: Path) -> Path:
    """Aggregate the runs under ``paths`` into ``out``: runs.parquet/csv, figures/, report.md and report.html."""
    found, unfinished = find_runs(paths)
    if not found:
        raise FileNotFoundError(f"no finished runs under {', '.join(map(str, paths))}")
    table = runs_table(found)
    for col in ("reason", "hardware", "model", "workload_label", "engine"):
        if col not in table:
            table[col] = None
    table = normalize(table)
    table["base_label"] = table["engine_label"]
    table = name_series(table)
    x = sweep_axis(table[usable(table)]) if usable(table).any() else None
    table = fold_params(table, x)
    out.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["base_label"]).to_parquet(out / "runs.parquet", index=False)
    table.drop(columns=["base_label"]).to_csv(out / "runs.csv", index=False)
    figures = make_figures(table, {str(r.path): r for r in found}, x, out)
    from harness.bench import paper  # it draws with this module's helpers

    ok = table[usable(table)]
    sections = [s for s in [paper.section(table, out, sustain_factor(found)), virtual_section(ok, x)] if s is not None]
    ratios = paging_ratios(ok, x)
    names = ", ".join(sorted(table["experiment"].dropna().unique())) if "experiment" in table else ""
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    report = Report(title=f"kvbench report: {names}",
                    intro=f"Generated {stamp} by `harness report` from {len(found)} runs in {', '.join(map(str, paths))}.",
                    methodology=methodology_link(out), statement=paging_statement(ok, ratios, x),
                    summary=summary_table(table, x), ratios=ratio_table(ratios, x), notes=_notes(table, unfinished),
                    figures=figures, provenance=_provenance(found), sections=sections)
    (out / "report.md").write_text(_markdown(report))
    (out / "report.html").write_text(_html(report, out))
    return out / "report.md"


def _markdown(r: Report) -> str:
    md = [f"# {r.title}", "", r.intro, f"Every figure is defined in the methodology: [docs/methodology.md]({r.methodology}).",
          "", "## What paging bought and cost", "", r.statement, "", "## Runs", "", SUMMARY_NOTE, "",
          markdown_table(r.summary), ""]
    if not r.ratios.empty:
        md += ["## Paged against contiguous", "", RATIO_NOTE, "", markdown_table(r.ratios), ""]
    for s in r.sections:
        md += [f"## {s.title}", "", *[line for p in s.paragraphs for line in (p, "")]]
        for title, df in s.tables:
            md += [f"### {title}", "", markdown_table(df), ""]
        md += [line for f in s.figures for line in _md_figure(f)]
    if r.notes:
        md += ["## Notes", "", *[f"- {n}" for n in r.notes], ""]
    md += ["## Figures", ""]
    md += [line for f in r.figures for line in _md_figure(f)]
    md += ["## Provenance", "", *[f"- {p}" for p in r.provenance], ""]
    return "\n".join(md)


def _html(r: Report, out: Path) -> str:
    esc = html.escape
    href = r.methodology if not Path(r.methodology).is_absolute() else Path(r.methodology).as_uri()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(r.title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "img{max-width:100%}figcaption{font-style:italic;font-size:13px;margin-bottom:2em}</style></head><body>",
             f"<h1>{esc(r.title)}</h1><p>{esc(r.intro)} Every figure is defined in the methodology: "
             f"<a href='{esc(href)}'>docs/methodology.md</a>.</p>",
             f"<h2>What paging bought and cost</h2><p>{esc(r.statement)}</p>",
             f"<h2>Runs</h2><p>{esc(SUMMARY_NOTE)}</p>", r.summary.to_html(index=False, border=0)]
    if not r.ratios.empty:
        parts += [f"<h2>Paged against contiguous</h2><p>{esc(RATIO_NOTE)}</p>", r.ratios.to_html(index=False, border=0)]
    for s in r.sections:
        parts += [f"<h2>{esc(s.title)}</h2>", *[f"<p>{esc(p)}</p>" for p in s.paragraphs]]
        for title, df in s.tables:
            parts += [f"<h3>{esc(title)}</h3>", df.to_html(index=False, border=0)]
        parts += [_html_figure(f, out) for f in s.figures]
    if r.notes:
        parts += ["<h2>Notes</h2><ul>", *[f"<li>{esc(n)}</li>" for n in r.notes], "</ul>"]
    parts.append("<h2>Figures</h2>")
    parts += [_html_figure(f, out) for f in r.figures]
    parts += ["<h2>Provenance</h2><ul>", *[f"<li>{esc(p)}</li>" for p in r.provenance], "</ul></body></html>"]
    return "".join(parts)


def _md_figure(f: Figure) -> list[str]:
    return [f"### {f.title}", "", f"![{f.title}](figures/{f.name}.png)", "", f"*{f.caption}*", ""]


def _html_figure(f: Figure, out: Path) -> str:
    data = base64.b64encode(f.file(out).read_bytes()).decode()
    return (f"<figure><h3>{html.escape(f.title)}</h3><img alt='{html.escape(f.title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="harness report", description="Write a report (Markdown, HTML, PNG figures) from run directories.")
    parser.add_argument("run_dirs", nargs="+", type=Path,
                        help="run or sweep directories (searched recursively), or `vllm bench serve --save-result` "
                             "JSON files to draw beside them")
    parser.add_argument("--out", type=Path, help="where to write (default: the one RUN_DIR; required with several "
                                                 "or with a JSON file)")
    args = parser.parse_args(argv)
    missing = [d for d in args.run_dirs if not d.is_dir() and not (d.is_file() and d.suffix == ".json")]
    if missing:
        print(f"error: {missing[0]} is neither a directory nor a JSON file", file=sys.stderr)
        return 2
    if args.out is None and (len(args.run_dirs) > 1 or not args.run_dirs[0].is_dir()):
        print("error: --out is required with several run directories or a JSON file", file=sys.stderr)
        return 2
    try:
        path = write_report(args.run_dirs, args.out or args.run_dirs[0])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {path.with_suffix('.html')}")
    return 0
