"""The library's own exceptions. The command layer turns them into one-line errors."""


def first_line(e: BaseException) -> str:
    """An exception's first line of text (its type's name if it has none), for one-line errors."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class MeliError(Exception):
    """Base of every error a user can cause and fix (bad input, bad settings)."""


class InputError(MeliError):
    """A data file is missing, unreadable, malformed or lacks what is needed."""


class ModelFileError(MeliError):
    """A checkpoint or ONNX file is missing, corrupt, or not one of ours."""


class OutputError(MeliError):
    """An output path cannot be written."""


class SettingError(MeliError):
    """A setting's value cannot work. The library names the setting as Python does
    (``top_k``); a command names it as its user typed it (``--top-k``, `meli.command`)."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem
