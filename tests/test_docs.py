"""README stays a short front page and the docs site stays whole: the test command CI runs, an example
for every command, every nav page and every relative link present. (`mkdocs build --strict` itself runs
in CI, not here.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from segkit.cli import main
from tests.helpers import REPO

ROOT = REPO
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TEST_COMMAND = "pip install -e '.[test]' && python -m pytest -q"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _code_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return lines


def _nav_pages(nav: list) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


def _relative_links(path: Path) -> list[str]:
    links = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor on the same page
        links.append(target.split("#", 1)[0])
    return links


def test_readme_is_at_most_250_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_readme_test_command_is_the_one_ci_runs():
    assert TEST_COMMAND in README.read_text(encoding="utf-8")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert TEST_COMMAND in ci_lines


@pytest.mark.parametrize("command", sorted(main.commands))
def test_readme_has_an_example_of_every_command(command):
    pattern = re.compile(rf"(^|&&\s*)segkit {re.escape(command)}(\s|$)")
    assert any(pattern.search(line.strip()) for line in _code_lines(README.read_text(encoding="utf-8"))), (
        f"README has no example line for `segkit {command}`")


def test_every_nav_page_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    pages = _nav_pages(config["nav"])
    assert pages
    missing = [page for page in pages if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist: {missing}"


@pytest.mark.parametrize("page", [README, *sorted(DOCS.rglob("*.md"))], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page):
    broken = [link for link in _relative_links(page) if not (page.parent / link).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"
