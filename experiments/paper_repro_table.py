"""Print a `paper_repro` sweep's finished runs as one short table (what a device call shows last)."""

from __future__ import annotations

import sys

import pandas as pd

from harness.bench.results import find_runs, runs_table

runs, unfinished = find_runs(sys.argv[1:])
table = runs_table(runs)
if table.empty:
    sys.exit("no finished runs")
cols = ["repeat", "engine_label", "workload", "load", "rate", "status", "num_requests", "duration_s", "norm_latency_mean",
        "mean_running", "max_running", "preemptions", "output_tok_s", "kv_token_states_used_frac"]
table = table[[c for c in cols if c in table]].sort_values(["workload", "engine_label", "load", "repeat"])
with pd.option_context("display.max_rows", 500, "display.width", 250, "display.float_format", "{:.4g}".format):
    print(table.to_string(index=False))
print(f"{len(runs)} runs finished ({(table['status'] == 'ok').sum()} ok), {len(unfinished)} unfinished")
