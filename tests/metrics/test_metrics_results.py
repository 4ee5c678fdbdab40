"""Results tables: Markdown + CSV + W&B columns/rows."""

from __future__ import annotations

import csv

import pytest
import torch

from ctrlgen.lightning_modules.metrics.results import (
    METRIC_DEFINITIONS,
    RESULT_COLUMNS,
    make_rows,
    to_markdown,
    to_wandb_table,
    write_results,
)


def test_definitions_cover_the_metric_layer():
    for k in ("fid", "inception_score", "precision", "recall", "kid", "canny_f1", "depth_rmse", "lpips", "clip_score"):
        assert METRIC_DEFINITIONS[k]["definition"]
        assert isinstance(METRIC_DEFINITIONS[k]["higher_is_better"], bool)
    ref = METRIC_DEFINITIONS["fid"]["reference"]
    assert "VAR-d16" in ref and "3.55" in ref and "1.5" in ref and "900" in ref and "0.96" in ref


def test_write_results_markdown_and_csv(tmp_path):
    rows = make_rows({"fid": torch.tensor(3.14159), "test/canny_f1": 0.4321, "custom": 7}, setting="cfg=1.5")
    md, cs = write_results(rows, tmp_path / "out" / "results.md", title="ECM d16")
    assert md.name == "results.md" and cs.name == "results.csv"
    text = md.read_text()
    assert text.startswith("# ECM d16")
    header = text.splitlines()[2]
    assert header == "| metric | value | setting | definition | reference |"
    assert "| fid | 3.1416 | cfg=1.5 |" in text
    assert "3.55" in text  # reference figure carried into the table
    assert "binary per-pixel F1" in text  # "test/canny_f1" resolved to the canny_f1 definition
    with open(cs, newline="") as fh:
        got = list(csv.DictReader(fh))
    assert [r["metric"] for r in got] == ["fid", "test/canny_f1", "custom"]
    assert float(got[0]["value"]) == pytest.approx(3.14159, rel=1e-6)  # CSV keeps full precision
    assert got[2]["definition"] == "" and got[2]["value"] == "7"


def test_markdown_escapes_pipes_and_formats_small_numbers():
    md = to_markdown([{"metric": "a|b", "value": 1.5e-5, "definition": "x|y", "reference": ""}])
    line = md.splitlines()[2]
    assert "a\\|b" in line and "x\\|y" in line and "1.5e-05" in line


def test_to_wandb_table_columns_and_numeric_rows():
    cols, data = to_wandb_table(make_rows({"fid": torch.tensor(2.5), "precision": 0.8}, method="ecm"))
    assert cols[:2] == ["metric", "value"] and cols[-2:] == list(RESULT_COLUMNS[-2:]) and "method" in cols
    assert len(data) == 2 and all(len(r) == len(cols) for r in data)
    v = data[0][cols.index("value")]
    assert isinstance(v, float) and v == 2.5
    assert data[1][cols.index("method")] == "ecm"
    with pytest.raises(KeyError, match="metric"):
        to_wandb_table([{"value": 1}])
