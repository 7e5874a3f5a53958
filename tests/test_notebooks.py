"""The notebooks: each one runs from top to bottom without an error, in quick mode.

nbclient executes an in-memory copy of every notebook in notebooks/ in a fresh python3 kernel,
whose working directory is notebooks/ and whose environment is this process's plus MINICCA_QUICK=1
(the notebooks then draw fewer samples and fine-tune for a few steps). Any exception in any cell,
assertions included, fails the test, with the cell and its traceback. The committed files are
never written: they keep the outputs of a full run, made with
`jupyter nbconvert --to notebook --execute --inplace notebooks/<name>.ipynb`. Tests check that they
do, and that those outputs were made with today's minicca.py: every notebook's first code cell
prints `minicca.py sha256: <16 hex digits>` of the file it imported, and the committed value must
equal the current file's hash. TMPDIR points into pytest's tmp_path, so whatever a notebook writes
to temporary folders is cleaned up with it.

The exercises: every notebooks/instructor/solutions_*.py lists, per checker of notebooks/course.py,
the instructor's answer (which the checker must accept) and named wrong answers (which it must
reject, printing the mistake's name); nothing a student notebook runs may read those files.
"""
import contextlib
import hashlib
import importlib.util
import io
import pathlib
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO_DIR = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_DIR / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
SOLUTION_FILES = sorted((NOTEBOOKS_DIR / "instructor").glob("solutions_*.py"))
CELL_TIMEOUT = 600  # seconds per cell; in quick mode the slowest cell takes well under a minute
FIRST_CELL = re.compile(r"quick mode: (True|False)\nminicca\.py sha256: ([0-9a-f]{16})\n")
RERUN = ("re-run the notebooks in full: "
         "jupyter nbconvert --to notebook --execute --inplace notebooks/<name>.ipynb")


def stream_text(nb):
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.get("output_type") == "stream")


def first_cell_text(nb):
    """What the first code cell printed on stdout (warnings on stderr do not count)."""
    first = next(c for c in nb.cells if c.cell_type == "code")
    return "".join(o.get("text", "") for o in first.outputs
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def minicca_sha256():
    return hashlib.sha256((REPO_DIR / "minicca.py").read_bytes()).hexdigest()[:16]


def execute_quick(path, monkeypatch, tmp_path, **env):
    """Run the notebook at `path` in quick mode; return the executed copy. The file must not
    change."""
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
    expected = {"00_tour.ipynb", "01_cfg_to_cca.ipynb", "02_tradeoff.ipynb"}
    assert expected <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_quick_mode(path, monkeypatch, tmp_path):
    nb = execute_quick(path, monkeypatch, tmp_path)
    printed = FIRST_CELL.fullmatch(first_cell_text(nb))
    assert printed, (f"{path.name}: the first code cell must print exactly the lines 'quick mode: "
                     f"...' and 'minicca.py sha256: ...', it printed {first_cell_text(nb)!r}")
    assert printed.group(1) == "True", "the kernel did not see MINICCA_QUICK=1"
    assert printed.group(2) == minicca_sha256(), \
        f"{path.name} imported another minicca.py than the repository's"


@pytest.mark.parametrize("name", ["00_tour.ipynb", "02_tradeoff.ipynb"])
def test_notebook_trains_the_checkpoints_when_they_are_absent(name, monkeypatch, tmp_path):
    """With no reference checkpoints, the notebook runs the pipeline first (the micro preset, in
    quick mode)."""
    nb = execute_quick(NOTEBOOKS_DIR / name, monkeypatch, tmp_path,
                       MINICCA_PRETRAINED=str(tmp_path / "absent"))
    assert "training them with --preset micro" in stream_text(nb)


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_notebook_has_instructor_solutions():
    """00, 01 and 02 each have a solutions file: their exercises are graded."""
    assert {p.name for p in SOLUTION_FILES} >= {f"solutions_0{k}.py" for k in range(3)}


@pytest.mark.parametrize("path", SOLUTION_FILES, ids=lambda p: p.name)
def test_checkers_accept_the_solutions_and_name_the_mistakes(path):
    """Each checker in course.py accepts the instructor's answer and rejects every wrong answer
    listed for it, printing that mistake's name; every checker has at least one wrong answer."""
    sys.path.insert(0, str(NOTEBOOKS_DIR))
    try:
        course = load_module(NOTEBOOKS_DIR / "course.py", "course")
    finally:
        sys.path.remove(str(NOTEBOOKS_DIR))
    solutions = load_module(path, path.stem)
    assert solutions.SOLUTIONS and set(solutions.WRONG) == set(solutions.SOLUTIONS), path.name
    for name, answer in solutions.SOLUTIONS.items():
        assert getattr(course, name)(answer, verbose=False) is True, f"{name} rejects its solution"
        for mistake, wrong in solutions.WRONG[name]:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                accepted = getattr(course, name)(wrong)
            assert accepted is False, f"{name} accepts the wrong answer {mistake!r}"
            assert mistake in printed.getvalue(), \
                f"{name} did not name {mistake!r}; it printed {printed.getvalue()!r}"


def test_student_files_hold_no_solutions():
    """Nothing a student notebook runs or imports reads the solutions or carries them."""
    course = (NOTEBOOKS_DIR / "course.py").read_text(encoding="utf-8")
    code = [c.source for p in NOTEBOOKS for c in nbformat.read(str(p), as_version=4).cells
            if c.cell_type == "code"]
    for text in [course] + code:
        assert not re.search(r"(import|from)\s+instructor|solutions_\d", text), text[:200]
    assert not re.search(r"def (_solution\w*|solution|show_solution)\(", course)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_come_from_one_full_run(path):
    nb = nbformat.read(str(path), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        f"{path.name}: not executed top to bottom in one kernel; {RERUN}"
    errors = [f"{o.ename}: {o.evalue}" for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} was saved with errors: {errors}"
    assert "quick mode: False" in stream_text(nb), f"{path.name} was saved from a quick run"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_come_from_todays_minicca(path):
    """A change to minicca.py makes every notebook's saved outputs stale until they are re-run."""
    nb = nbformat.read(str(path), as_version=4)
    printed = FIRST_CELL.fullmatch(first_cell_text(nb))
    assert printed, f"{path.name}: its saved first cell shows no 'minicca.py sha256: ...'; {RERUN}"
    assert printed.group(2) == minicca_sha256(), (
        f"{path.name}: its saved outputs were made with minicca.py sha256 {printed.group(2)}, "
        f"but minicca.py is now {minicca_sha256()}; {RERUN}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_exercises_are_handed_out_unanswered(path):
    """At least two graded exercises per notebook, each committed as handed out: the placeholder
    (None, or a function that raises NotImplementedError) makes its checker print 'not answered
    yet', never a pre-filled wrong answer nor the answer itself."""
    nb = nbformat.read(str(path), as_version=4)
    graded = [c for c in nb.cells if c.cell_type == "code" and "course.check_" in c.source]
    assert len(graded) >= 2, f"{path.name}: {len(graded)} graded exercises"
    for cell in graded:
        printed = "".join(o.get("text", "") for o in cell.outputs
                          if o.get("output_type") == "stream")
        assert "MISTAKE: not answered yet" in printed, f"{path.name}: {cell.source[:80]!r}"


def test_course_helpers_stay_small():
    """notebooks/course.py is setup and checkers, not a second code base beside minicca.py."""
    lines = (NOTEBOOKS_DIR / "course.py").read_text(encoding="utf-8").count("\n")
    assert lines <= 400, f"notebooks/course.py has {lines} lines; keep it at most 400"
