"""Every notebook in notebooks/ runs top to bottom (nbclient, a real kernel) and is committed without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
REPO = NOTEBOOKS.parent


def execute(name: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # The kernel (a subprocess of this process) imports this checkout and writes its cache under cwd.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("KVCOMPRESS_CACHE_DIR", str(cwd / "cache"))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))


def test_every_notebook_is_tested_and_committed_without_outputs():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == ["analysis", "quickstart"]
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"


def test_quickstart_notebook_trains_plots_and_compares_caches(tmp_path, data_dir, monkeypatch):
    nb = execute("quickstart", tmp_path, monkeypatch)
    text = outputs_text(nb)
    assert "val PPL" in text and "int4" in text and "B/token" in text
    images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the curves and the caches
    assert (tmp_path / "outputs" / "notebook_quickstart" / "run" / "metrics.json").is_file()


@pytest.mark.slow
def test_analysis_notebook_makes_its_own_multirun_on_a_fresh_clone(tmp_path, data_dir, monkeypatch):
    monkeypatch.delenv("KVC_RESULTS_DIR", raising=False)
    nb = execute("analysis", tmp_path, monkeypatch)
    text = outputs_text(nb)
    assert "4 runs under" in text and "paired seeds" in text and "rank=0.375" in text
    assert (tmp_path / "outputs" / "notebook_analysis" / "sweep" / "report" / "training_curves.png").is_file()
