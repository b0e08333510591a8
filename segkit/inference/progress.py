"""Progress bars of predictions: what `progress=` takes, and the tqdm bar segkit draws itself.

`segkit.predict`, `segkit.Model.predict`, `segkit.predict_array` and the CLI report to a bar with
`reset(total)` (the number of tiles) and `update(n)` (per tile batch). By default the library draws
one (`ProgressBar`, tqdm.auto on stderr: a widget in notebooks), as tqdm users expect; `progress=False`
draws none, and any object with `reset` and `update` (a tqdm bar, a GUI's relay) is reported to instead.

`ProgressBar` is made at its first `reset` (the total is known then), so nothing is drawn before a run's
header or an error that comes first; and its final state is drawn once, by `close`: the update that
completes it only counts (tqdm drew the finished bar at that update and again at close, so a log, where
stderr is no terminal, ended with two "N/N" lines with different rates).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from segkit.errors import OptionTypeError


class Progress(Protocol):
    """What predict reports progress to (a tqdm bar fits): the total number of tiles, then each batch."""

    def reset(self, total: int | None = None) -> Any: ...

    def update(self, n: int = 1) -> Any: ...


class ProgressBar:
    """A tqdm bar on stderr made at its first `reset`, whose final state is drawn once (by `close`).

    `auto` picks tqdm.auto (a notebook widget where one runs, else text), the library's default; the CLI
    draws text. `disable` draws nothing (the CLI's --quiet). A context manager that closes the bar."""

    def __init__(self, unit: str = "tile", *, disable: bool = False, auto: bool = False) -> None:
        self._unit, self._disable, self._auto = unit, disable, auto
        self._bar: Any = None

    def reset(self, total: int | None = None) -> None:
        if self._bar is None:
            if self._auto:
                from tqdm.auto import tqdm
            else:
                from tqdm import tqdm

            self._bar = tqdm(total=total, unit=self._unit, disable=self._disable, file=sys.stderr)
        else:
            self._bar.reset(total=total)

    def update(self, n: int = 1) -> None:
        bar = self._bar
        if bar is None:
            return
        if bar.total is not None and bar.n + n >= bar.total:
            bar.n += n  # finished: `close` draws it, once, with the run's mean rate
        else:
            bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_progress(progress: Any) -> None:
    """`progress` is True, False, None or a bar (`reset(total)` and `update(n)`): else OptionTypeError,
    before any work."""
    if progress is None or isinstance(progress, bool):
        return
    if not (callable(getattr(progress, "reset", None)) and callable(getattr(progress, "update", None))):
        raise OptionTypeError(f"progress must be True (a bar on stderr, the default), False (none) or a bar with "
                              f"reset(total) and update(n) (a tqdm bar), not {progress!r}")


@contextmanager
def progress_to(progress: Progress | bool | None, unit: str = "tile") -> Iterator[Progress | None]:
    """The bar a run reports to: a new `ProgressBar` (tqdm.auto) for True, closed when the run ends; none
    for False or None; else `progress` itself, left open (its owner closes it)."""
    check_progress(progress)
    if progress is True:
        with ProgressBar(unit, auto=True) as bar:
            yield bar
    else:
        yield None if progress is False else progress  # not `or`: a tqdm bar of no total has no truth value
