"""benchmarks/report.py: rows without a figure (a section that could not measure) and skipped sections."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("benchmarks_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NOT_MEASURED = {
    "what": "recompiles over 5 hot-swaps",
    "figure": None,
    "against": "count",
    "goal": 0,
    "detail": "peftkit not available (peftkit has no prepare_model_for_compiled_hotswap); PEFT 0",
}
RATIO = {"what": "step", "figure": 0.9, "against": "PEFT", "goal": 1.0, "detail": "peftkit 9 ms, PEFT 10 ms"}
COUNT = {"what": "graph breaks", "figure": 0, "against": "count", "goal": 0, "detail": "peftkit 0; PEFT 36"}


def test_a_row_without_a_figure_shows_n_a_and_misses_its_goal():
    report = _report()
    assert report.met(NOT_MEASURED) is False
    assert report.met(COUNT) is True and report.met(RATIO) is True
    lines = report.table([RATIO, NOT_MEASURED, COUNT]).splitlines()
    assert lines[2] == "| step | 0.90 × PEFT | ≤ 1 × PEFT | yes | peftkit 9 ms, PEFT 10 ms |"
    assert lines[3] == (
        "| recompiles over 5 hot-swaps | n/a | ≤ 0 | **no** | "
        "peftkit not available (peftkit has no prepare_model_for_compiled_hotswap); PEFT 0 |"
    )
    assert lines[4] == "| graph breaks | 0 | ≤ 0 | yes | peftkit 0; PEFT 36 |"


def test_the_chart_draws_only_rows_with_a_figure_and_a_goal_above_zero():
    svg = _report().chart(
        [RATIO, NOT_MEASURED, COUNT, dict(RATIO, what="ratio without figure", figure=None)], "t"
    )
    assert svg.count("<rect ") == 1 and "step (against PEFT)" in svg
    assert "recompiles" not in svg and "ratio without figure" not in svg


def test_a_section_names_the_sections_left_out(tmp_path):
    report = _report()
    setting = {
        "device": "cuda",
        "machine": "GPU",
        "rounds": 25,
        "date": "2026-01-01",
        "versions": "v",
        "skipped": ["graph-breaks"],
    }
    output = tmp_path / "benchmarks.md"
    output.write_text("# Benchmarks\n\nprose\n\n<!-- results:cpu -->\ncpu rows\n<!-- /results:cpu -->\n")
    report.write(output, [RATIO], setting)
    page = output.read_text()
    assert "GPU; 25 interleaved rounds per timing; 2026-01-01; v. Sections not run: graph-breaks.\n" in page
    assert "prose" in page and "cpu rows" in page  # the rest of the page stays
    assert (tmp_path / "benchmarks-cuda.svg").exists()
    report.write(output, [RATIO], dict(setting, skipped=[]))
    assert "Sections not run" not in output.read_text()
