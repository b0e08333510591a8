"""Counts in words: the one place that says "1 slice" and "2 slices" (every message with a count uses it)."""

from __future__ import annotations

#: Plurals the rules below get wrong ("ch" said as k).
_IRREGULAR = {"epoch": "epochs"}


def plural(noun: str) -> str:
    """The English plural of `noun` (its last word): slice -> slices, class -> classes, batch -> batches,
    entry -> entries, epoch -> epochs."""
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        return f"{head} {_IRREGULAR[last]}" if head else _IRREGULAR[last]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u", ""):
        return noun[:-1] + "ies"
    return noun + "s"


def counted(count: int, noun: str, plural_form: str | None = None) -> str:
    """`count` and `noun`, in the plural unless the count is 1: (1, 'slice') -> '1 slice', (0, 'slice') ->
    '0 slices'; an irregular plural is passed as `plural_form`. The noun may carry words before it
    ('input channel')."""
    return f"{count} {noun if count == 1 else plural_form or plural(noun)}"
