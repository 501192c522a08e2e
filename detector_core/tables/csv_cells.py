"""CSV cells that a spreadsheet will not run: every CSV the product writes passes its text through here.

A cell that begins with ``= + - @`` (or a tab or carriage return) is a formula to Excel,
LibreOffice and Google Sheets: a reviewer's note ``=HYPERLINK("http://x", "open")`` or an
object named ``+cmd|' /C calc'!A0`` would run when an auditor opens the export. OWASP's
advice is followed: such a cell gets a leading apostrophe, which spreadsheets show as
text. A cell that already begins with an apostrophe before one of those characters gets
one more, so ``restore`` (what ``jobs.audit verdicts import`` applies) gives back exactly the
text that was written. Numbers are never touched (a logit of -2.3 stays a number).
"""

from __future__ import annotations

__all__ = ["FORMULA_STARTS", "neutralise", "restore"]

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_ESCAPED = (*FORMULA_STARTS, "'")


def neutralise(text: str) -> str:
    """``text`` as a cell a spreadsheet shows as text (an apostrophe before a formula start)."""
    if text[:1] in FORMULA_STARTS or (text[:1] == "'" and text[1:2] in _ESCAPED and len(text) > 1):
        return "'" + text
    return text


def restore(text: str) -> str:
    """The text that ``neutralise`` was given (the exact inverse)."""
    if len(text) > 1 and text[0] == "'" and text[1] in _ESCAPED:
        return text[1:]
    return text
