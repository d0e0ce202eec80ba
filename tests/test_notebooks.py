"""Every notebook runs top to bottom on the bundled default model, and its .ipynb is in sync.

Notebooks are written as jupytext percent-format .py files (what reviews diff) and paired with
an output-stripped .ipynb. No exclusions: a notebook that cannot run here is fixed or deleted.
"""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


def test_there_are_notebooks():
    assert [p.stem for p in NOTEBOOKS] == ["01_inference", "02_qat", "03_kernels"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_pair_in_sync(path):
    jupytext = pytest.importorskip("jupytext")
    ipynb = path.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: run `jupytext --sync {path.name}`"
    from_py = [c.source for c in jupytext.read(path).cells]
    from_nb = [c.source for c in jupytext.read(ipynb).cells]
    assert from_py == from_nb, f"{ipynb.name} differs from {path.name}: run jupytext --sync"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    jupytext = pytest.importorskip("jupytext")
    # The kernel is a fresh process: let it import this checkout even when it is not installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    nbclient = pytest.importorskip("nbclient")
    nb = jupytext.read(path)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" for o in outputs), "no plot was shown"
