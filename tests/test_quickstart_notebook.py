"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel (nbclient), on a store in a
temporary folder: any error in any cell fails the test. The notebook is committed without outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
PLOTLY = "application/vnd.plotly.v1+json"


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_quickstart_runs_in_a_kernel(tmp_path, monkeypatch):
    from samlab.runs.store import Store

    url = f"sqlite:///{tmp_path / 'runs' / 'samlab.db'}"
    monkeypatch.setenv("SAMLAB_STORE", url)  # the kernel, its scheduler and workers inherit it
    monkeypatch.delenv("SAMLAB_RUNS_DIR", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert f"store: {url}" in "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    figures = [out for out in outputs if PLOTLY in out.get("data", {})]
    assert len(figures) >= 6  # the live panel, two curve overlays, spectrum, density, landscape

    runs = Store(url).list_runs(kind=None)
    assert sorted(r["kind"] for r in runs) == ["hessian", "hessian", "landscape", "train", "train"]
    assert {r["status"] for r in runs} == {"completed"}
    assert {r["params"]["optim"]["method"] for r in runs if r["kind"] == "train"} == {"sam", "msam"}
