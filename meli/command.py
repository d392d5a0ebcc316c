"""What the three command-line tools share: logging to stderr, one-line errors, signals.

Only the stages' ``cli.py`` modules import this (and click); the library raises
`meli.errors.MeliError`, and `reports_errors` turns it into click's one-line ``Error: …``
with exit code 1. SIGTERM (what schedulers send) and SIGINT (Ctrl-C) unwind the command like
an error, so every temporary file is removed and an existing output stays as it was; the
exit code is then 128 + the signal's number, as a shell reports a killed command.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from typing import Callable

import click

from meli.errors import MeliError, SettingError
from meli.formats import shown


class Interrupted(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT (a BaseException, as KeyboardInterrupt is,
    so that no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Stopped(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("alembic", "mlflow", "urllib3", "gensim", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def one_line(message: str) -> str:
    """A message on one line whatever it quotes (a file name may hold a newline): line breaks
    and other control characters written as Python escapes, and the bytes of a file name that
    are not UTF-8 (which Python holds as lone surrogates) as ``\\xNN``, as a shell shows them."""

    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in shown(message))


def reports_errors(func=None, *, interrupted: Callable[[dict], str] | None = None, out_of_memory: str = ""):
    """Turn the library's errors into a one-line click error and exit code 1, and SIGTERM or
    SIGINT into ``Error: interrupted by SIGTERM[; what]`` and exit code 128 + signal, where
    `interrupted(kwargs)` says what the interruption left (e.g. the output untouched). Running
    out of memory is one error line too, with the command's advice (`out_of_memory`)."""
    if func is None:
        return functools.partial(reports_errors, interrupted=interrupted, out_of_memory=out_of_memory)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        def stop(signum, frame):
            raise Interrupted(signum)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return func(*args, **kwargs)
        except SettingError as e:  # the library names the setting; the command names its flag
            raise click.ClickException(one_line(f"--{e.setting.replace('_', '-')}: {e.problem}")) from e
        except MeliError as e:
            raise click.ClickException(one_line(str(e))) from e
        except MemoryError as e:
            raise click.ClickException(f"out of memory (the machine's, or this process's limit){out_of_memory}") from e
        except Interrupted as e:
            for s in previous:  # a second signal while unwinding must not print a traceback
                signal.signal(s, signal.SIG_IGN)
            what = f"; {interrupted(kwargs)}" if interrupted is not None else ""
            raise _Stopped(f"interrupted by {e}{what}", 128 + e.signum) from None
        finally:
            for s, handler in previous.items():
                if signal.getsignal(s) is stop:
                    signal.signal(s, handler)

    return wrapper


def console_script(command: click.Command) -> Callable[[], None]:
    """The installed entry point of `command`: runs it as click does, then ends the process
    with its exit code at once, output flushed, without the interpreter's teardown: there,
    Arrow's thread pools can abort a process that did all its work (``terminate called without
    an active exception``, exit 134; apache/arrow#34314), which a scheduler reads as a failed job.
    Everything a command writes is closed (renamed into place) before it returns."""

    def main() -> None:
        try:
            command.main(standalone_mode=True)
            code = 0
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can reach it
                pass
        os._exit(code)

    return main
