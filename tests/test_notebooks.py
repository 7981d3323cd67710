"""The three notebooks execute on small (smoke-preset) results and draw their figures."""

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient


@pytest.mark.parametrize("name,folder,figures", [("test_mnist.ipynb", "mnist", 12), ("test_xxz.ipynb", "xxz", 9),
                                                  ("heissian.ipynb", "mnist", 2)])
def test_notebook_executes_and_draws(name, folder, figures, smoke_results, monkeypatch):
    base, _ = smoke_results
    monkeypatch.setenv("QMU_RESULTS", str(base / folder))
    monkeypatch.setenv("QMU_PRESET", "smoke")
    monkeypatch.setenv("QMU_CORRECTED", str(base / f"{folder}_corrected"))  # mnist: both fidelities
    book = nbformat.read(ROOT / name, as_version=4)
    NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    images = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= figures
