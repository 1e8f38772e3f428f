"""Every walkthrough notebook runs top to bottom without an error, from a copy of
``notebooks/`` alone (the notebooks extra), and fits a JupyterLab page."""

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("nbclient", reason="the notebooks extra is part of the test install")
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))

import nbformat  # noqa: E402
from execute import execute, tidy  # noqa: E402

PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_committed_notebook_is_valid(path):
    """What Jupyter checks before it opens a file (a display output without metadata fails)."""
    nbformat.validate(nbformat.read(path, as_version=4))


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_committed_notebook_opens_unmodified(path):
    """JupyterLab rewrites a notebook whose metadata differs from what it would save: the
    committed file is byte for byte what nbformat writes back, and its kernelspec is the
    installed python3 kernel's (ipykernel's display name), so nothing changes on opening."""
    from jupyter_client.kernelspec import KernelSpecManager

    raw = path.read_bytes()
    assert (nbformat.writes(nbformat.read(path, as_version=4)) + "\n").encode() == raw
    spec = KernelSpecManager().get_kernel_spec("python3")
    kernelspec = nbformat.read(path, as_version=4).metadata.kernelspec
    assert (kernelspec.name, kernelspec.display_name, kernelspec.language) == ("python3", spec.display_name, "python")
    # and the language_info the kernel reports, which JupyterLab would fill in (the version varies by machine)
    from ipykernel.ipkernel import IPythonKernel

    saved = dict(nbformat.read(path, as_version=4).metadata.language_info)
    assert {**saved, "version": ""} == {**IPythonKernel.language_info, "version": ""}


def test_tidy_keeps_notebooks_valid():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1")
    cell.outputs = [
        nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="}),
        nbformat.v4.new_output("execute_result", data={"text/plain": "1"}, execution_count=7),
        nbformat.v4.new_output("stream", name="stdout", text="hi\n"),
    ]
    for out in cell.outputs[:2]:
        del out["metadata"]  # as some kernels' messages arrive
    nb.cells = [cell]
    tidy(nb)  # validates, raising on an invalid result
    assert [o.get("metadata") for o in cell.outputs] == [{}, {}, None]
    assert cell.outputs[1]["execution_count"] == 1


NOTEBOOK_LINE_LENGTH = int(re.search(r"^line-length = (\d+)", (NOTEBOOKS / "ruff.toml").read_text(), re.M)[1])
PAGE = 100  # columns of a printed line JupyterLab shows unwrapped beside a code cell


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_code_fits_the_line_length(path):
    """JupyterLab does not wrap code: no line past the notebooks' line length (ruff's, for them)."""
    nb = nbformat.read(path, as_version=4)
    long = [(i, line) for i, c in enumerate(nb.cells) if c.cell_type == "code" for line in c.source.splitlines()
            if len(line) > NOTEBOOK_LINE_LENGTH]  # fmt: skip
    assert NOTEBOOK_LINE_LENGTH <= PAGE and not long, long


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_printed_lines_fit_the_page(path):
    """Printed lines wrap mid-word past the page; tables are rendered (Markdown or HTML) instead."""
    nb = nbformat.read(path, as_version=4)
    long = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "text/html" in data or "text/markdown" in data:
                continue  # rendered as a table, wrapped by the browser
            text = out.get("text", "") or data.get("text/plain", "")
            long += [(i, line) for line in text.splitlines() if len(line) > PAGE]
    assert not long, long


# A figure in a notebook's prose: a number that is not a citation's year, part of a name
# (AVX-512, 1.58-bit, 16x16) or a count up to 16, and not inside `code` (formulas, names).
_FIGURE = re.compile(r"(?<![\w.*/^±+-])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e-?\d+)?%?(?![\w*^-]|\.\d)")


def figures(markdown: str) -> list[str]:
    text = re.sub(r"`[^`]*`|\]\([^)]*\)|arXiv:\S+", " ", markdown)
    found = []
    for fig in _FIGURE.findall(text):
        plain = fig.rstrip("%").replace(",", "")
        if plain.isdigit() and (int(plain) <= 16 or 1900 <= int(plain) <= 2099):
            continue
        found.append(fig)
    return found


def unprinted_figures(nb) -> list[tuple[int, str]]:
    """The figures of the prose that no output of the notebook prints."""
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    kinds = ("text/markdown", "text/plain")
    printed = "\n".join(o.get("text", "") + "".join(o.get("data", {}).get(k, "") for k in kinds) for o in outputs)
    return [(i, fig) for i, c in enumerate(nb.cells) if c.cell_type == "markdown" for fig in figures(c.source)
            if not re.search(r"(?<![\d.])" + re.escape(fig) + r"(?![\d]|\.\d)", printed)]  # fmt: skip


def test_figures_are_what_prose_quotes():
    assert figures("zeros: 26.7% of 12,480 (ICLR 2021, AVX-512, 1.58-bit, 16x16) at 1e-7; `0.3585 x`, 4 x 4") == [
        "26.7%",
        "12,480",
        "1e-7",
    ]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_every_figure_in_the_prose_is_printed(path):
    """No number in a notebook's Markdown that its saved outputs do not print (its source is
    the cell that computes it); test_notebook_runs checks the same on a fresh run."""
    assert not unprinted_figures(nbformat.read(path, as_version=4))


NEEDS_DATA = {"05_where_ternary_loses"}  # reads CIFAR-10 test images from TINYVIT158_DATA


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    """From a copy of notebooks/ alone: the examples and weights come from the installed
    package (and, for the notebooks that need them, the test images from TINYVIT158_DATA)."""
    if path.stem in NEEDS_DATA and not os.environ.get("TINYVIT158_DATA"):
        pytest.skip("TINYVIT158_DATA is not set (CI sets it)")
    shutil.copytree(NOTEBOOKS, tmp_path / "notebooks", ignore=shutil.ignore_patterns("__pycache__", "*.ipynb"))
    shutil.copy(path, tmp_path / "notebooks" / path.name)
    nb = tidy(execute(tmp_path / "notebooks" / path.name))  # raises CellExecutionError on any error; tidy validates
    from ipykernel.ipkernel import IPythonKernel

    assert nb.metadata.language_info == IPythonKernel.language_info  # kept from the kernel's reply
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert not unprinted_figures(nb)  # the prose still quotes what this run printed
    assert sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})) >= 1


def test_there_are_five_notebooks():
    assert [p.name[:2] for p in sorted(NOTEBOOKS.glob("*.ipynb"))] == ["01", "02", "03", "04", "05"]


def test_notebook_02_quotes_the_size_table():
    from tinyvit158.weights import default_weights_path, format_size_table, load_weights, size_table

    path = default_weights_path()
    text = (NOTEBOOKS / "02_bit_packing.ipynb").read_text()
    nb = nbformat.reads(text, as_version=4)
    printed = "".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "")
                      for c in nb.cells for o in c.get("outputs", []))  # fmt: skip
    assert format_size_table(size_table(load_weights(path), path)) in printed
