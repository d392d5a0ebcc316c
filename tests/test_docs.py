"""The README and docs/: short for users, links that lead somewhere, results written by commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_the_readme_names_the_two_setup_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = text.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in setup.strip().splitlines()] == [["make", "demo"], ["make", "test"]]


def test_ci_runs_the_readmes_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test\b", ci, re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file(page):
    for target, _ in LINK.findall(page.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which is not there"


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("results-*.md")), ids=lambda p: p.name)
def test_results_pages_say_which_command_wrote_them_without_machine_paths(page):
    text = page.read_text(encoding="utf-8")
    command = re.search(r"^Written by `python (bench/\S+\.py)([^`]*)`", text, re.M)
    assert command, f"{page.name} does not say which command wrote it"
    assert (ROOT / command.group(1)).is_file()
    assert f"--write docs/{page.name}" in command.group(2)
    assert re.search(r"\b20\d\d-\d\d-\d\d\b", text), "no date"
    assert not re.search(r"(?<![\w.])/(tmp|home|work|root|Users)/", text), "an absolute path of the machine it ran on"
