"""The README's cost table is the rendering of the last measurement (`docs/costs.json`, written by
`python -m kvcompress.costs`); the extrapolation uses the run's own counts."""

from __future__ import annotations

import json

import pytest

from kvcompress import costs


def test_readme_cost_table_is_the_rendering_of_docs_costs_json():
    data = json.loads(costs.JSON_PATH.read_text())
    readme = costs.README.read_text()
    start, end = readme.index(costs.BEGIN), readme.index(costs.END) + len(costs.END)
    assert readme[start:end] == costs.render(data), "rerun: python -m kvcompress.costs --render-only"
    assert {row.id for row in costs.ROWS} == set(data["rows"])  # every row measured (or said not to be)


def test_extrapolation_uses_the_runs_counts():
    stage = {"name": "lm", "steps_per_epoch": 286, "max_epochs": 10, "val_batches": 125, "step_s": 1.5,
             "val_batch_s": 0.4, "measured_steps": 5}  # fmt: skip
    assert costs.stage_estimate(stage) == pytest.approx({"epoch_s": 286 * 1.5 + 125 * 0.4, "stage_s": 4790.0})
    row = {"stages": [stage], "batch_size": 8, "seq_len": 128, "train_windows": 2288, "train_windows_asked": 9000,
           "train_windows_available": 2288, "val_windows": 1000}  # fmt: skip
    what, cost = costs.cells(costs.ROWS[2], row)
    assert "286 steps an epoch, up to 10 epochs" in what and ": all that exist of the 9,000 asked" in what
    assert "up to 79.8 min" in cost and "extrapolated from 5 measured steps" in cost
    assert costs.cells(costs.ROWS[-1], {"measured": False})[1].startswith("not measured yet")
