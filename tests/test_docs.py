"""README and benchmarks/README tables are generated from the committed JSON results."""

from __future__ import annotations

from helpers import ROOT, import_benchmark

render = import_benchmark("tables").render


def test_bench_tables_are_up_to_date():
    for path in (ROOT / "README.md", ROOT / "benchmarks" / "README.md"):
        text = path.read_text()
        assert render(text) == text, f"{path}: run python -m benchmarks.tables --update"


def test_readme_names_the_test_command_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/dev.sh test" in readme and "bash scripts/dev.sh test" in ci
    assert "bash scripts/dev.sh demo" in readme


def test_readme_is_a_user_guide():
    """At most ~400 lines; measurements live in benchmarks/README.md, so no commit hashes here."""
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 400
    hashes = [h for h in re.findall(r"\b[0-9a-f]{7,40}\b", readme) if re.search(r"[a-f]", h) and re.search(r"\d", h)]
    assert not hashes, f"commit hashes in README.md: {hashes}"


def test_steps_behind_reads_a_delay_off_a_falling_curve():
    """The loss table's "steps behind BF16": a run that is the baseline shifted by k steps is k behind."""
    steps_behind = import_benchmark("tables")._steps_behind
    base = [12.0 - 0.01 * i for i in range(300)]  # falling at 0.01 per step
    for k in (0, 3, 17):
        late = [12.0] * k + base[: len(base) - k]
        assert steps_behind(late, base, 50) == k
    assert steps_behind([0.0] * 300, base, 50) == 0  # better than the baseline: not behind
