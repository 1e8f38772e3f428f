"""The documents say what the code and the measurements say: README's real run is what
``predict examples/`` prints, its speed table is computed from the bench tables in
``docs/PERFORMANCE.md``, its accuracies are the shipped files' own, and no prose file
speaks of how the work was organised or of a machine's paths."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT, run_module

README = ROOT / "README.md"
PROSE = [README, ROOT / "weights" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def code_block_after(text: str, marker: str) -> str:
    """The first fenced block after ``marker``."""
    rest = text[text.index(marker) :]
    return rest.split("```", 2)[1].split("\n", 1)[1]


def test_the_real_run_is_what_predict_prints():
    out = run_module("tinyvit158.predict", "examples/")
    assert out.returncode == 0, out.stderr
    assert code_block_after(README.read_text(), "## A real run") == out.stdout


def bench_rows(block: str) -> dict[tuple[str, int], float]:
    """``{(variant, batch): img/s}`` of one bench table."""
    rows = {}
    for line in block.splitlines():
        parts = line.split()
        if len(parts) > 3 and not line.startswith("#") and parts[1].isdigit():
            rows[parts[0], int(parts[1])] = float(parts[2])
    return rows


def speed_table() -> str:
    """README's speed table, from the quiet cifar10-tiny and DeiT-Small runs of PERFORMANCE.md."""
    perf = (ROOT / "docs" / "PERFORMANCE.md").read_text()
    tiny = bench_rows(code_block_after(perf, "## cifar10-tiny, batch 1 and 64"))
    deit = bench_rows(code_block_after(perf, "## DeiT-Small shapes"))
    lines = [
        "| shapes, batch | engine | with int8 attention | OpenVINO int8 | PyTorch float32 "
        "| engine / OpenVINO int8 | engine / PyTorch |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows, batch in (("cifar10-tiny", tiny, 1), ("cifar10-tiny", tiny, 64), ("DeiT-Small", deit, 8)):
        e, q, ov, pt = (rows[v, batch] for v in ("engine", "engine-int8attn", "openvino-int8", "torch-fp32"))
        lines.append(
            f"| {name}, {batch} | {e:,.0f} | {q:,.0f} | {ov:,.0f} | {pt:,.0f} "
            f"| {e / ov:.2f}x (int8 attention {q / ov:.2f}x) | {e / pt:.1f}x |"
        )
    return "\n".join(lines)


def test_the_speed_table_is_computed_from_the_bench_tables():
    assert speed_table() in README.read_text()


def test_quoted_accuracies_are_the_shipped_files_own():
    from tinyvit158.weights import load_weights

    text = README.read_text()
    shipped = load_weights(ROOT / "weights" / "cifar10-tiny.safetensors").source
    assert f"classifies {shipped['torch_test_acc']:.2%} of" in text
    for name in ("cifar10-tiny-int8attn", "cifar10-tiny-attn4", "cifar10-tiny-int", "cifar10-tiny-bitlinear"):
        source = load_weights(ROOT / "weights" / f"{name}.safetensors").source
        acc = source.get("engine_test_acc", source.get("torch_test_acc"))  # an exported file: its twin's
        assert re.search(rf"`weights/{name}\.safetensors`\s+\({acc:.2%}\)", text), name


# how the work was organised, and machine paths: never in the project's prose
FORBIDDEN = [
    (re.compile(r"\b(sessions?|legs?|leg-\d+)\b", re.I), "a period of work"),
    (re.compile(r"\bround \d|\b(CPU|GPU) rounds?\b", re.I), "a round of work"),
    (re.compile(r"\bissues? \d+|(?<![\w&])#\d{1,4}\b", re.I), "an issue number"),
    (re.compile(r"(?<![\w/])/(work|tmp|home|root|Users|mnt|opt)/"), "an absolute machine path"),
    # a hex word of letters and digits; a float's mantissa and exponent (1.12194440e-01) is not one
    (
        re.compile(r"\bcommit [0-9a-f]{7,40}\b|(?<![\w.])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}(?![\w+-])"),
        "a commit hash",
    ),
]


def prose_texts():
    for path in PROSE:
        yield str(path.relative_to(ROOT)), path.read_text()
    for nb in NOTEBOOKS:
        cells = json.loads(nb.read_text())["cells"]
        text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        yield f"{nb.relative_to(ROOT)} (markdown)", text


TEXTS = dict(prose_texts())


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_prose_speaks_of_the_project_only(name):
    text = TEXTS[name]
    found = []
    for pattern, what in FORBIDDEN:
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"line {line}: {m.group(0)!r} ({what})")
    assert not found, f"{name}: " + "; ".join(found[:12])


def test_the_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= 220


def test_the_ledger_totals_are_what_explain_prints():
    from tinyvit158.kernels import kernel_path

    out = run_module(
        "tinyvit158.predict", "examples/cat.jpg", "--explain", "--weights", "weights/cifar10-tiny.safetensors"
    )
    assert out.returncode == 0, out.stderr
    totals = [line for line in out.stdout.splitlines() if line.startswith(("per image:", "skipping zero"))]
    assert len(totals) == 2 and "\n".join(totals) in code_block_after(README.read_text(), "## What ternary saves")
    assert f"# numerics: float (float attention); fast engine; kernel path: {kernel_path()}" in out.stdout
    out = run_module("tinyvit158.predict", "examples/cat.jpg", "--explain")  # the default: integer numerics
    assert out.returncode == 0, out.stderr
    assert "integer numerics: no float operation from the input codes to the logits" in out.stdout
    assert f"# numerics: integer (int8 attention); fast engine; kernel path: {kernel_path()}" in out.stdout


def test_the_reader_written_from_format_md_reproduces_the_golden_logits(tmp_path, monkeypatch):
    """docs/READER.md's NumPy reader, which imports nothing of tinyvit158, gives exactly the
    golden logits (its own printed check), and exactly the engine's integers on a file with
    other attention numerics (4-bit codes, probabilities clipped at 1/4)."""
    text = (ROOT / "docs" / "READER.md").read_text()
    reader_code, check_code = re.findall(r"```python\n(.*?)```", text, re.S)
    assert "tinyvit158" not in reader_code.replace('"tinyvit158"', "")  # the format's name only
    monkeypatch.chdir(ROOT)
    ns: dict = {}
    exec(reader_code, ns)  # noqa: S102 (the page's own code)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(check_code, ns)  # noqa: S102
    assert "equal to the golden logits: True" in out.getvalue()

    import numpy as np

    from tinyvit158.convert import change_numerics
    from tinyvit158.engine import Engine
    from tinyvit158.integer import to_q16
    from tinyvit158.weights import load_weights, save_weights

    base = load_weights(ROOT / "weights" / "cifar10-tiny-int.safetensors")
    changes = {"attention_bits": 4, "attention_prob_bits": 4, "attention_prob_clip": 0.25}
    save_weights(tmp_path / "int4.safetensors", change_numerics(base, changes))
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    reader = ns["Reader"](tmp_path / "int4.safetensors")
    ours = np.stack([reader.logits(to_q16(im)) for im in x])
    assert np.array_equal(ours, Engine(load_weights(tmp_path / "int4.safetensors")).integers(x))
