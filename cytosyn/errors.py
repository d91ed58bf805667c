"""Error text a person reads (in manifests, reports, on the console) is always one line."""

from __future__ import annotations


def one_line(problem: object, limit: int = 400) -> str:
    """``problem`` (an exception or text) with its whitespace collapsed, cut at ``limit`` characters."""
    text = " ".join(str(problem).split())
    if not text and isinstance(problem, BaseException):
        text = problem.__class__.__name__
    return text[:limit]
