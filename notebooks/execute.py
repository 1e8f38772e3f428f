"""Execute the walkthrough notebooks top to bottom and save them tidy, outputs included.

    python notebooks/execute.py            # every notebook, in place
    python notebooks/execute.py 03         # those whose name contains "03"

Execution counts are renumbered from 1 and cell and notebook metadata are reduced to
what a reader needs, so a re-run changes only what the code printed or drew; the result
must pass ``nbformat.validate`` (what Jupyter checks before it opens a file). The tests
(tests/test_notebooks.py) execute the same way and fail on any error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 300  # per cell
_WITH_METADATA = ("display_data", "execute_result")


def execute(path: Path) -> nbformat.NotebookNode:
    """Run a notebook in its own folder; raises nbclient's CellExecutionError on any error."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    return nb


# what ipykernel's python3 kernel reports: saved as JupyterLab saves it, it opens unmodified
KERNEL_DISPLAY_NAME = "Python 3 (ipykernel)"


def tidy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    # language_info as the kernel reported it on execution (JupyterLab fills in what is missing
    # on opening and marks the notebook modified); only its Python version varies by machine
    info = nb.metadata.get("language_info") or {"name": "python"}
    nb.metadata = {
        "kernelspec": {
            "name": "python3",
            "display_name": KERNEL_DISPLAY_NAME,
            "language": "python",
        },
        "language_info": dict(info),
    }
    count = 0
    for cell in nb.cells:
        cell.metadata = {}
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            for out in cell.get("outputs", []):
                if "execution_count" in out:
                    out["execution_count"] = count
                # metadata: required on display and result outputs by the nbformat schema
                if out.get("output_type") in _WITH_METADATA:
                    out["metadata"] = out.get("metadata") or {}
                else:
                    out.pop("metadata", None)  # and not allowed on stream and error outputs
    nbformat.validate(nb)  # Jupyter refuses to open a notebook that fails this
    return nb


def main(argv: list[str]) -> int:
    for path in sorted(HERE.glob("*.ipynb")):
        if argv and not any(a in path.name for a in argv):
            continue
        print(f"executing {path.name} ...", flush=True)
        nbformat.write(tidy(execute(path)), path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
