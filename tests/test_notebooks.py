"""The notebooks: each one runs from top to bottom without an error, in quick mode.

nbclient executes an in-memory copy of every notebook in notebooks/ in a fresh python3 kernel, whose working
directory is notebooks/ and whose environment is this process's plus MINICCA_QUICK=1 (the notebooks then draw
fewer samples, sweep coarser grids and fine-tune for a few steps). Any exception in any cell fails the test, with
the cell and its traceback. The committed files are never written: they keep the outputs of a full run, made with
`jupyter nbconvert --to notebook --execute --inplace notebooks/<name>.ipynb`, and a test checks that they do.
TMPDIR points into pytest's tmp_path, so whatever a notebook writes to temporary folders is cleaned up with it.
"""
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell; in quick mode the slowest cell takes well under a minute


def stream_text(nb):
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.get("output_type") == "stream")


def execute_quick(path, monkeypatch, tmp_path, **env):
    """Run the notebook at `path` in quick mode; return the executed copy. The file itself must not change."""
    committed = path.read_bytes()
    nb = nbformat.reads(committed.decode("utf-8"), as_version=4)
    for key, value in {"MINICCA_QUICK": "1", "TMPDIR": str(tmp_path), **env}.items():
        monkeypatch.setenv(key, value)  # before the kernel starts: it inherits this environment
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()  # raises CellExecutionError on the first cell that fails
    assert path.read_bytes() == committed, f"running {path.name} changed the committed file"
    return nb


def test_the_notebooks_are_there():
    assert {"00_tour.ipynb", "01_cfg_to_cca.ipynb", "02_tradeoff.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_quick_mode(path, monkeypatch, tmp_path):
    nb = execute_quick(path, monkeypatch, tmp_path)
    assert "quick mode: True" in stream_text(nb), "the kernel did not see MINICCA_QUICK=1"


@pytest.mark.parametrize("name", ["00_tour.ipynb", "02_tradeoff.ipynb"])
def test_notebook_trains_the_checkpoints_when_they_are_absent(name, monkeypatch, tmp_path):
    """With no reference checkpoints, the notebook runs the pipeline first (the micro preset, in quick mode)."""
    nb = execute_quick(NOTEBOOKS_DIR / name, monkeypatch, tmp_path, MINICCA_PRETRAINED=str(tmp_path / "absent"))
    assert "training them with --preset micro" in stream_text(nb)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_come_from_one_full_run(path):
    nb = nbformat.read(str(path), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        f"{path.name}: not executed top to bottom in one kernel; rerun it with nbconvert --execute --inplace"
    errors = [f"{o.ename}: {o.evalue}" for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} was saved with errors: {errors}"
    assert "quick mode: False" in stream_text(nb), f"{path.name} was saved from a quick run"
