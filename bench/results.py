"""The pages under docs/ that the benchmarks write: what was measured, by which command."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as one would type it from the repository root: the script
    and every path argument relative to the current folder (no machine's absolute paths)."""
    argv = list(sys.argv if argv is None else argv)

    def shown(arg: str) -> str:
        name, eq, value = arg.partition("=")
        if eq and os.path.isabs(value):  # NAME=/abs/path (the --compare and --model forms)
            return f"{name}={os.path.relpath(value)}"
        return os.path.relpath(arg) if os.path.isabs(arg) else arg

    return "python " + shlex.join([os.path.relpath(argv[0]), *map(shown, argv[1:])])


def write_results(path: Path, title: str, lines: list[str]) -> None:
    """A results page: its title, the command that wrote it, then the table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\nWritten by `{command_line()}`; rerun it to regenerate this page.\n\n"
                    + "\n".join(lines) + "\n", encoding="utf-8")


def machine() -> str:
    """Today's date and this machine, as a results page's first line starts."""
    import datetime as dt
    import platform

    return f"Measured {dt.date.today()} on {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def publish(path: Path | None, title: str, lines: list[str]) -> None:
    """Print a results page's lines, and write the page to `path` (``--write``) when given."""
    print("\n".join(lines))
    if path is not None:
        write_results(path, title, lines)
