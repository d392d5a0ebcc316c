"""The pages under docs/ that the benchmarks write: what was measured, by which command."""

from __future__ import annotations

from pathlib import Path


def write_results(path: Path, title: str, command: str, lines: list[str]) -> None:
    """A results page: its title, the command that wrote it, then the table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\nWritten by `{command}`; rerun it to regenerate this page.\n\n"
                    + "\n".join(lines) + "\n", encoding="utf-8")
