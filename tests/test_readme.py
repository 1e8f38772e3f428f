from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (ROOT / "README.md").read_text()
    assert "pytest" in ci
    assert ci in readme.splitlines(), "the last line of .ci/run must be README.md's test command, verbatim"


def test_documents_quote_the_size_table_of_the_shipped_file():
    """README and model card show exactly what ``python -m tinyvit158.weights`` prints."""
    from tinyvit158.weights import default_weights_path, format_size_table, load_weights, size_table

    path = default_weights_path()
    table = format_size_table(size_table(load_weights(path), path))
    for doc in ("README.md", "weights/README.md"):
        assert table in (ROOT / doc).read_text(), doc
