"""Report helpers that need no runs on disk."""

from __future__ import annotations

import pandas as pd

from harness.report import name_series


def test_runs_of_several_names_under_one_engine_label_become_separate_series():
    table = pd.DataFrame({"engine_label": ["paged", "paged", "paged@http", "contiguous", "contiguous"],
                          "param.name": ["offline", "offline_text", "serve", "offline", "offline"]})
    labels = name_series(table)["engine_label"].tolist()
    assert labels == ["paged · offline", "paged · offline_text", "paged@http", "contiguous", "contiguous"]
    assert table["engine_label"].tolist()[0] == "paged"  # the caller's table is left as it was
    assert name_series(table.drop(columns="param.name"))["engine_label"].tolist() == table["engine_label"].tolist()
