"""User errors: a mistake in a flag, a file or a value. The CLI prints such an error as one line
(naming the culprit) and exits 2; any other exception is a bug in ditlab and shows its traceback.

UserError is a ValueError (and its file variants are also FileNotFoundError, FileExistsError or
NotADirectoryError), so library callers can catch the built-in types they expect."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake of the user's, described in one line that names the flag, file or value."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class UserFileExistsError(UserError, FileExistsError):
    """A file the user named exists and would be replaced."""


class UserNotADirectoryError(UserError, NotADirectoryError):
    """A folder the user named does not exist or is not a folder."""


def one_line(e: BaseException) -> str:
    """The message of `e` with its whitespace and line breaks collapsed (its type name if empty)."""
    return " ".join(str(e).split()) or type(e).__name__


class UserWriteError(UserError, OSError):
    """A file could not be written for a reason of the user's machine: the disk is full, the folder
    is not writable or is on a read-only file system. The message names the path."""
