"""One line for a description bioimageio.spec refuses: the field, its value and what is wrong.

bioimageio.spec reports a refused rdf.yaml as a Markdown table of pydantic errors whose locations
hold the names of the union branches it tried (`inputs.0.axes.2.space.size.(ParameterizedSize).min`),
and many errors for one mistake (one per branch). `first_problem` picks the error that says most
(the deepest field the file holds; at equal depth, a branch mismatch last), and names it as the file does
(`inputs[0].axes[2].size.min`) with the value written there, read from the description's own YAML.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: pydantic error types that mostly say "this union branch does not fit", not what is wrong.
_BRANCH_MISMATCHES = frozenset({"missing", "extra_forbidden", "model_type", "model_attributes_type", "union_tag_invalid",
                                "union_tag_not_found", "dict_type", "literal_error"})
_MISSING = object()


def field_path(loc: Sequence[Any], raw: Any) -> tuple[str, Any, int]:
    """The field an error location names, as written in the file, its value there, and how many of its
    parts the file holds (a missing field: its last part is named, its value is `_MISSING`).

    Location parts that the file does not hold (union branch names such as 'space' or
    '(ParameterizedSize)') are skipped; a key the file lacks ends the path there."""
    path, node, found = "", raw, 0
    for i, part in enumerate(loc):
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            path, node, found = f"{path}[{part}]", node[part], found + 1
        elif isinstance(part, str) and isinstance(node, Mapping) and part in node:
            path, node, found = f"{path}.{part}" if path else part, node[part], found + 1
        elif i == len(loc) - 1 and isinstance(part, str) and isinstance(node, Mapping):
            return (f"{path}.{part}" if path else part), _MISSING, found
    return path, node, found


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def first_problem(errors: Sequence[Any], raw: Any) -> str | None:
    """The most telling of bioimageio.spec's errors as 'FIELD is VALUE: WHAT' (None without errors).

    Parameters
    ----------
    errors : sequence of ErrorEntry
        bioimageio.spec's errors (`loc`, `msg`, `type`), from a validation summary's details.
    raw : Any
        The description as its YAML reads (plain data).
    """
    best: tuple[tuple[int, int, int], str] | None = None
    for order, error in enumerate(errors):
        loc = [part for part in error.loc if part != ""]
        if not loc:
            continue
        path, value, found = field_path(loc, raw)
        if not path:
            continue
        what = str(error.msg).strip().splitlines()[0][:200]
        if value is _MISSING:
            line = f"{path} is missing ({what})"
        elif str(error.type) == "extra_forbidden":
            line = f"{path} is not a field of a model description ({what})"
        elif isinstance(value, (Mapping, list)):
            line = f"{path}: {what}"
        else:
            line = f"{path} is {_shown(value)}: {what}"
        rank = (found, 0 if str(error.type) in _BRANCH_MISMATCHES else 1, -order)
        if best is None or rank > best[0]:
            best = (rank, line)
    return None if best is None else best[1]
