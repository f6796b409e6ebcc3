"""Error messages: every user-facing error of ditlab is one line."""

from __future__ import annotations


def one_line(e: BaseException) -> str:
    """The message of `e` with its whitespace and line breaks collapsed (its type name if empty)."""
    return " ".join(str(e).split()) or type(e).__name__
