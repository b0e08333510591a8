"""README's headline score names the exact commands that reproduce it (issue 25: the adapted Rand error 0.0221
came from `segkit segment` with settings found only in a benchmark table, while `segkit predict --tta d4
--instances` with the model's stored settings gives 0.0410). The commands are parsed by click here, so every
option they use exists and takes the value written; their settings are those of the benchmark row."""

from __future__ import annotations

import re
import shlex

import pytest

from segkit.cli import main
from tests.helpers import REPO

HEADLINE = "0.0221"


def _block_after(text: str, marker: str) -> list[str]:
    """The lines of the first fenced code block after the first line holding `marker` (indented or not)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    fence = next(i for i in range(start, len(lines)) if lines[i].strip().startswith("```"))
    end = next(i for i in range(fence + 1, len(lines)) if lines[i].strip().startswith("```"))
    return [line.strip() for line in lines[fence + 1:end] if line.strip()]


def _parsed(line: str) -> tuple[str, dict]:
    """A `segkit CMD ...` line parsed by the command's own click parser: unknown options or bad values raise."""
    args = shlex.split(line, comments=True)
    assert args[0] == "segkit", line
    name = args[1]
    with main.commands[name].make_context(name, args[2:]) as ctx:
        return name, dict(ctx.params)


@pytest.fixture(scope="module")
def readme_commands() -> list[tuple[str, dict]]:
    return [_parsed(line) for line in _block_after((REPO / "README.md").read_text(encoding="utf-8"), HEADLINE)]


def test_the_headline_commands_parse_and_chain(readme_commands):
    (predict, p), (segment, s), (evaluate, e) = readme_commands
    assert (predict, segment, evaluate) == ("predict", "segment", "evaluate")
    assert p["model_path"] is None and p["tta"] == "d4"  # the bundled model, with TTA
    assert (REPO / p["sources"][0]).is_file() and (REPO / e["labels"]).is_file()  # the bundled crop, its labels
    assert s["source"] == p["output"] and e["prediction"] == str(s["output"])
    assert e["instances"] and e["model"] is None


def test_the_headline_settings_are_the_benchmark_rows(readme_commands):
    """The watershed settings in README's commands are those of benchmarks row (d), whose score is the headline."""
    benchmarks = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    row = re.search(r"\| \*\*\(d\) TTA d4 \+ seeded watershed\*\* \| threshold ([\d.]+), seed distance ([\d.]+) \|"
                    r"[^|]*\| \*\*([\d.]+)\*\*", benchmarks)
    assert row, "benchmarks.md has no row (d)"
    threshold, distance, score = row.groups()
    segment = dict(readme_commands)["segment"]
    assert float(segment["threshold"]) == float(threshold) and segment["seed_distance"] == float(distance)
    assert score == HEADLINE


@pytest.mark.parametrize("page", ["docs/commands/segment.md", "docs/commands/demo.md"])
def test_the_docs_name_the_same_commands(page):
    readme = _block_after((REPO / "README.md").read_text(encoding="utf-8"), HEADLINE)
    assert _block_after((REPO / page).read_text(encoding="utf-8"), HEADLINE) == readme
