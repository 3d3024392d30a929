"""Our runs beside the vLLM paper's published figures (Kwon et al., SOSP 2023): the report's paper section.

Applies to Poisson-rate sweeps of the paper's systems (the ``paper_repro`` experiment): Orca
(Max / Pow2 / Oracle) are our contiguous engine under each reservation policy, vLLM our paged
engine. Three comparisons, each a figure and a table of paper vs ours:

- Fig. 2, the share of the KV memory in use by token states, reservation, internal and external
  fragmentation, per workload and system at the highest rate the system ran in each of its
  repeats (the most memory pressure it was measured under in all of them);
- Fig. 12, normalized latency against the request rate, and the sustainable rate of each system
  by the rule of harness.bench.sustain, with the ratios the paper's text quotes;
- Fig. 13, the mean number of requests batched (``mean_running``) at the paper's rates (ShareGPT
  2 req/s, Alpaca 30 req/s), or, where a system was skipped there as saturated, at the highest
  rate it ran below it (the table says so).

The paper's numbers are typed in here, with where each comes from; nothing else is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter, ScalarFormatter

from harness.bench.kv_breakdown import COMPONENTS
from harness.bench.report import COMPONENT_LABELS, PAPER_FIG2, Figure, _save, _stacked_bar, fmt_estimate, fmt_ratio
from harness.bench.stats import median_ci, ratio_ci
from harness.bench.sustain import LATENCY, Sustained, complete_repeats, sustainable_rates, unloaded_latency

SYSTEMS = ("Orca (Max)", "Orca (Pow2)", "Orca (Oracle)", "vLLM")
RESERVATIONS = {"max": "Orca (Max)", "pow2": "Orca (Pow2)", "oracle": "Orca (Oracle)"}
# Section 6.2's text: "On the ShareGPT dataset, vLLM can sustain 1.7x-2.7x higher request rates compared to Orca
# (Oracle) and 2.7x-8x compared to Orca (Max)" (over OPT-13B, 66B and 175B). For Alpaca the text gives no number: "a
# similar trend", vLLM's advantage over Oracle and Pow2 less pronounced for OPT-175B.
PAPER_RATIOS = {"ShareGPT": {"vLLM / Orca (Oracle)": (1.7, 2.7), "vLLM / Orca (Max)": (2.7, 8.0)}, "Alpaca": {}}
# Fig. 13: average number of batched requests serving OPT-13B, ShareGPT at 2 req/s and Alpaca at 30 req/s.
PAPER_FIG13 = {
    "ShareGPT": (2.0, {"Orca (Max)": 7.00, "Orca (Pow2)": 9.81, "Orca (Oracle)": 13.62, "vLLM": 30.42}),
    "Alpaca": (30.0, {"Orca (Max)": 7.00, "Orca (Pow2)": 43.24, "Orca (Oracle)": 72.75, "vLLM": 132.44}),
}
# What differs from the paper's setup by construction, whatever the runs show (the reasons a reader weighs first).
SETUP_DIFFERENCES = (
    "What differs from the paper by construction: the hardware (the paper: OPT-13B on one A100-40GB); the model family "
    "(a 13B Llama has the same KV per token as OPT-13B, with RoPE and a gated MLP); random weights with exact output "
    "lengths (`ignore_eos`), the best case for Orca (Oracle); lengths drawn to the datasets' published means instead "
    "of the traces; Poisson seeds per repeat and a finite window per rate; and our scheduler (FCFS admission, chunked "
    "prefill, recompute preemption, CUDA graphs) instead of vLLM 0.1's. Absolute rates and batch sizes therefore "
    "scale with this machine's speed; the ratios between systems are what compare. By Little's law (batch = rate x "
    "time in the system) a faster engine batches fewer requests at the same rate, so Fig. 13 compares only where "
    "every system is loaded alike.")
SYSTEM_COLORS = dict(zip(SYSTEMS, ("#d9534f", "#f2b134", "#7f5a9e", "#4c9a2a")))


@dataclass
class Section:
    """A titled part of the report: paragraphs, captioned tables and figures."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def paper_workload(name: str) -> str | None:
    low = str(name).lower()
    return "ShareGPT" if "sharegpt" in low else "Alpaca" if "alpaca" in low else None


def system_of(row: pd.Series) -> str | None:
    if row.get("engine") == "paged":
        return "vLLM"
    if row.get("engine") == "contiguous":
        return RESERVATIONS.get(row.get("engine.reservation"))
    return None


def paper_runs(table: pd.DataFrame) -> pd.DataFrame:
    """The Poisson runs of the paper's systems on its workloads, with ``system`` and ``dataset`` columns."""
    if table.empty or not {"rate", "status", "workload", "engine"} <= set(table.columns):
        return table.iloc[0:0]
    runs = table[(table.get("arrival") == "poisson") & table["status"].isin(["ok", "skipped"])].copy()
    runs["system"] = [system_of(r) for _, r in runs.iterrows()]
    runs["dataset"] = runs["workload"].map(paper_workload)
    runs = runs[runs["system"].notna() & runs["dataset"].notna() & runs["rate"].notna()]
    if LATENCY not in runs:
        runs[LATENCY] = math.nan
    return runs[~((runs["status"] == "skipped") & ~runs["reason"].fillna("").str.startswith("saturated"))]


def applies(runs: pd.DataFrame) -> bool:
    """Whether ``paper_runs`` sweep at least two of the paper's systems over at least two rates on one of its workloads."""
    if runs.empty:
        return False
    return any(g["system"].nunique() >= 2 and g["rate"].nunique() >= 2 for _, g in runs.groupby("dataset"))


@dataclass
class WorkloadResult:
    dataset: str
    runs: pd.DataFrame
    l0: float
    l0_rate: float
    limit: float
    rates: dict[str, Sustained]
    incomplete: pd.DataFrame  # (system, repeat, rate it stopped at) of the repeats left out


def analyse(runs: pd.DataFrame, factor: float) -> list[WorkloadResult]:
    out = []
    for dataset, g in runs.groupby("dataset", sort=False):
        g, cut = complete_repeats(g)
        l0, at = unloaded_latency(g)
        limit = factor * l0
        rates = sustainable_rates(g, limit) if math.isfinite(limit) else {}
        out.append(WorkloadResult(dataset, g, l0, at, limit, rates, cut))
    return out


def _ordered(names) -> list[str]:
    return [s for s in SYSTEMS if s in set(names)]


def _rate_text(s: Sustained) -> str:
    bound = {">=": "≥ ", "<": "< "}.get(s.bound, "")
    return f"{bound}{fmt_estimate(s.estimate)}" + (f" (some repeats: {s.bound} the swept range)" if s.bound and not bound else "")


def fig12_table(results: list[WorkloadResult]) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, ratios = [], []
    for r in results:
        for system in _ordered(r.rates):
            s = r.rates[system]
            rows.append({"workload": r.dataset, "system": system, "sustainable rate (req/s)": _rate_text(s),
                         "per repeat": ", ".join(f"{v:.3g}" for v in s.per_repeat), "limit (s/token)": f"{r.limit:.4g}"})
        for other in ("Orca (Oracle)", "Orca (Pow2)", "Orca (Max)"):
            if "vLLM" in r.rates and other in r.rates:
                e = ratio_ci(r.rates["vLLM"].per_repeat, r.rates[other].per_repeat)
                paper = PAPER_RATIOS.get(r.dataset, {}).get(f"vLLM / {other}")
                bounded = "; a bound" if r.rates["vLLM"].bound or r.rates[other].bound else ""
                ratios.append({"workload": r.dataset, "ratio": f"vLLM / {other}", "ours": fmt_ratio(e, "x") + bounded,
                               "paper (OPT-13B..175B)": f"{paper[0]:g}-{paper[1]:g}x" if paper else "not given"})
    return pd.DataFrame(rows), pd.DataFrame(ratios)


def fig12(results: list[WorkloadResult], out: Path) -> Figure:
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        ok = r.runs[r.runs["status"] == "ok"]
        for system in _ordered(ok["system"]):
            g = ok[ok["system"] == system]
            stats = [(rate, median_ci(v[LATENCY])) for rate, v in g.groupby("rate")]
            x = np.array([s[0] for s in stats])
            y = np.array([s[1].value for s in stats])
            err = np.array([[max(s[1].value - s[1].low, 0) if s[1].has_interval else np.nan for s in stats],
                            [max(s[1].high - s[1].value, 0) if s[1].has_interval else np.nan for s in stats]])
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, color=SYSTEM_COLORS[system], label=system)
            s = r.rates.get(system)
            if s is not None and not s.bound and math.isfinite(s.estimate.value):  # a bound is no crossing to mark
                ax.axvline(s.estimate.value, color=SYSTEM_COLORS[system], ls=":", lw=1.2)
        ax.axhline(r.limit, color="#555555", ls="--", lw=1, label=f"limit {r.limit:.3g} s/token")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("normalized latency (s/token)")
        ratio = _ratio_title(r)
        ax.set_title(f"{r.dataset}-like{ratio}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    figure = Figure("paper_fig12_normalized_latency", "Fig. 12: normalized latency against request rate",
                    "Mean end-to-end latency / output length against the Poisson request rate, per system (the paper's "
                    "Fig. 12). Points: medians over the repeats; bars: 95% bootstrap intervals. Dashed: the limit "
                    "(sustain_factor x the unloaded latency); dotted: each system's sustainable rate, where its curve "
                    "crosses the limit (median over repeats; none where a repeat never crossed). Titles: our vLLM / Orca ratios, with the paper's in "
                    "brackets where its text gives them.")
    return _save(fig, figure, out, [])


def _ratio_title(r: WorkloadResult) -> str:
    parts = []
    for other, short in (("Orca (Oracle)", "Oracle"), ("Orca (Max)", "Max")):
        if "vLLM" in r.rates and other in r.rates:
            e = ratio_ci(r.rates["vLLM"].per_repeat, r.rates[other].per_repeat)
            paper = PAPER_RATIOS.get(r.dataset, {}).get(f"vLLM / {other}")
            parts.append(f"vLLM/{short} {e.value:.2g}x" + (f" (paper {paper[0]:g}-{paper[1]:g}x)" if paper else ""))
    return ("\n" + ", ".join(parts)) if parts else ""


def _fig2_rows(r: WorkloadResult) -> pd.DataFrame:
    """Each system's ok runs at the highest rate it ran ok in every one of its repeats: the most memory pressure it
    was measured under in all of them."""
    ok = r.runs[r.runs["status"] == "ok"]
    repeats = ok.groupby("system")["repeat"].transform("nunique")
    in_all = ok.groupby(["system", "rate"])["repeat"].transform("nunique") == repeats
    top = ok[in_all].groupby("system")["rate"].transform("max")
    return ok[in_all][np.isclose(ok[in_all]["rate"], top)]


def fig2(results: list[WorkloadResult], out: Path) -> tuple[Figure, pd.DataFrame]:
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(5.2 * (len(results) + 1), 3.2), sharex=True)
    rows = []
    for ax, r in zip(axes, results):
        at = _fig2_rows(r)
        for k, system in enumerate(_ordered(at["system"])):
            g = at[at["system"] == system]
            rate = float(g["rate"].iloc[0])
            shares = {c: 100 * float(g[f"kv_{c}_used_frac"].median()) for c in COMPONENTS}
            total = sum(v for v in shares.values() if not math.isnan(v)) or 1.0
            _stacked_bar(ax, k, f"{system}\n{rate:.3g} req/s", {c: 100 * v / total for c, v in shares.items()})
            for c in COMPONENTS:
                rows.append({"workload": r.dataset, "system": system, "at (req/s)": f"{rate:.3g}",
                             "share of KV in use": COMPONENT_LABELS[c], "paper (Fig. 2)": f"{PAPER_FIG2[system][c]:.1f}%",
                             "ours": fmt_estimate(median_ci(g[f"kv_{c}_used_frac"]), percent=True)})
        ax.set_title(f"measured here: {r.dataset}-like", fontsize=9)
    for k, system in enumerate(SYSTEMS):
        _stacked_bar(axes[-1], k, system, PAPER_FIG2[system])
    axes[-1].set_title("Kwon et al. 2023, Fig. 2", fontsize=9)
    for ax in axes:
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of KV memory in use")
        ax.invert_yaxis()
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(COMPONENTS), fontsize=8,
               frameon=False)
    figure = Figure("paper_fig2_kv_breakdown", "Fig. 2: where the KV memory goes",
                    "Time-weighted share of the KV memory in use holding token states, reserved for tokens still to "
                    "come, or lost to internal and external fragmentation, per system, at the highest request rate "
                    "it ran in each of its repeats (the most memory pressure it was measured under in all of them; "
                    "medians over the repeats, rescaled to 100%), beside the paper's Fig. 2 (its "
                    "last segment is external fragmentation and others).")
    return _save(fig, figure, out, [], below_inches=0.35), pd.DataFrame(rows)


def _fig13_point(r: WorkloadResult, system: str, rate: float) -> tuple[pd.DataFrame, float]:
    """The system's ok runs at ``rate``, or at the highest rate below it that it ran (skipped above as saturated)."""
    ok = r.runs[(r.runs["status"] == "ok") & (r.runs["system"] == system)]
    below = ok[ok["rate"] <= rate * 1.01]
    if below.empty:
        return below, math.nan
    at = below["rate"].max()
    return below[np.isclose(below["rate"], at)], float(at)


def fig13(results: list[WorkloadResult], out: Path) -> tuple[Figure, pd.DataFrame]:
    chosen = [r for r in results if r.dataset in PAPER_FIG13]
    fig, axes = plt.subplots(1, len(chosen), figsize=(5.5 * len(chosen), 3.4), squeeze=False)
    rows = []
    for ax, r in zip(axes[0], chosen):
        rate, paper = PAPER_FIG13[r.dataset]
        systems = _ordered(r.runs["system"])
        ours = []
        for system in systems:
            g, at = _fig13_point(r, system, rate)
            e = median_ci(g["mean_running"]) if len(g) else median_ci([])
            ours.append(e)
            note = "" if math.isnan(at) or abs(at - rate) <= 0.01 * rate else f" (at {at:.3g} req/s: saturated above)"
            rows.append({"workload": f"{r.dataset} at {rate:g} req/s", "system": system, "paper": f"{paper[system]:.2f}",
                         "ours": fmt_estimate(e) + note, "ours / paper": f"{e.value / paper[system]:.2f}"})
        x = np.arange(len(systems))
        ax.bar(x - 0.2, [paper[s] for s in systems], 0.4, color="#bbbbbb", label="Kwon et al. 2023, Fig. 13")
        err = [[max(e.value - e.low, 0) if e.has_interval else 0 for e in ours],
               [max(e.high - e.value, 0) if e.has_interval else 0 for e in ours]]
        ax.bar(x + 0.2, [e.value for e in ours], 0.4, yerr=err, capsize=3, color=[SYSTEM_COLORS[s] for s in systems],
               label="measured here")
        ax.set_xticks(x, systems, fontsize=8)
        ax.set_ylabel("mean requests batched")
        ax.set_title(f"{r.dataset}-like at {rate:g} req/s", fontsize=10)
        ax.legend(handles=[Patch(color="#bbbbbb", label="Kwon et al. 2023, Fig. 13"),
                           Patch(facecolor="white", edgecolor="#333333", label="measured here (a colour per system)")],
                  fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    figure = Figure("paper_fig13_batch", "Fig. 13: requests batched",
                    "Mean number of sequences running per engine step (its batch after admissions), at the paper's "
                    "rates (grey: the paper's Fig. 13, OPT-13B on an A100). Ours: medians over the repeats with 95% "
                    "bootstrap intervals; a system skipped there as saturated is shown at the highest rate it ran.")
    return _save(fig, figure, out, []), pd.DataFrame(rows)


def section(table: pd.DataFrame, out: Path, factor: float) -> Section | None:
    """The paper section of a report, or None when the runs are not such a sweep."""
    runs = paper_runs(table)
    if not applies(runs):
        return None
    results = [r for r in analyse(runs, factor) if r.rates]
    if not results:
        return None
    rates, ratios = fig12_table(results)
    fig2_figure, fig2_rows = fig2(results, out)
    fig13_figure, fig13_rows = fig13(results, out)
    rule = (f"A system sustains a rate while the median over repeats of its mean normalized latency (E2E / output "
            f"tokens) stays within {factor:g} x the unloaded latency: the lowest median of any system at the lowest rate "
            "that every system ran (" + "; ".join(f"{r.dataset}: {r.l0:.4g} s/token at {r.l0_rate:.3g} req/s, limit "
                                                  f"{r.limit:.4g}" for r in results)
            + "). Its sustainable rate in one repeat is where its curve first crosses the limit, interpolated linearly "
            "between the swept rates; ≥ marks a system that never crossed (a lower bound), < one that started above.")
    left_out = [f"{r.dataset} {c['system']} repeat {c['repeat']} (stopped at {c['rate']:.3g} req/s)"
                for r in results for _, c in r.incomplete.iterrows()]
    paragraphs = [rule] + ([f"Left out as incomplete (the sweep stopped before their last rate; `resume=true` finishes "
                            f"them): {'; '.join(left_out)}."] if left_out else [])
    paragraphs.append(SETUP_DIFFERENCES)
    return Section("Beside the vLLM paper (Kwon et al., SOSP 2023)", paragraphs,
                   [("Fig. 12: sustainable rates (medians over repeats, 95% bootstrap intervals)", rates),
                    ("Fig. 12: how much higher a rate vLLM sustains", ratios),
                    ("Fig. 2: share of the KV memory in use", fig2_rows),
                    ("Fig. 13: mean requests batched", fig13_rows)],
                   [fig12(results, out), fig2_figure, fig13_figure])
