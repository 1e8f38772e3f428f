"""Every walkthrough notebook runs top to bottom without an error (the notebooks extra)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("nbclient", reason="the notebooks extra is part of the test install")
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))

from execute import execute  # noqa: E402


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_runs(path):
    nb = execute(path)  # raises CellExecutionError, with the failing cell, on any error
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})) >= 1


def test_there_are_four_notebooks():
    assert [p.name[:2] for p in sorted(NOTEBOOKS.glob("*.ipynb"))] == ["01", "02", "03", "04"]
