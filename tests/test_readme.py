from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (ROOT / "README.md").read_text()
    assert "pytest" in ci
    assert ci in readme.splitlines(), "the last line of .ci/run must be README.md's test command, verbatim"
