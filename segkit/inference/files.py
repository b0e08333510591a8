"""Many input files, one output file each: planned up front, predicted one by one, a failure
reported and skipped so one bad file never costs the others."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segkit.errors import Cancelled, InputError, OutputExistsError, SegkitError
from segkit.inference.pipeline import count_tiles
from segkit.io.outputs import check_folder, same_file
from segkit.io.tiff import list_tiff_files, open_stack
from segkit.models.geometry import Geometry


@dataclass(frozen=True)
class FileJob:
    source: str
    output: Path


@dataclass(frozen=True)
class FileOutcome:
    job: FileJob
    error: str | None = None  # None: written

    @property
    def ok(self) -> bool:
        return self.error is None


def plan_file_jobs(sources: Sequence[str], output_dir: Path, *, overwrite: bool = False,
                   skip_existing: bool = False) -> tuple[list[FileJob], list[FileJob]]:
    """One job per input file (folders and globs expanded), written to `output_dir/<name>.tif`.

    Returns (jobs to run, jobs skipped because their output exists). Two inputs with the same
    name, an output that would replace its input, or existing outputs without `overwrite` or
    `skip_existing` are refused before any work.
    """
    files: dict[Path, str] = {}
    for source in sources:
        for name in list_tiff_files(source):
            files.setdefault(Path(name).resolve(), name)
    if not output_dir.parent.exists():
        raise InputError(f"output folder {output_dir} cannot be created: {output_dir.parent} does not exist")
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"output {output_dir} is a file; several inputs need an output folder")
    check_folder(output_dir, create=True)  # writable (or creatable), not on a full disk
    jobs: dict[str, FileJob] = {}
    for resolved, name in files.items():
        output = output_dir / f"{Path(name).stem}.tif"
        if output.name in jobs:
            raise InputError(f"inputs {jobs[output.name].source} and {name} would both be written to {output}; "
                             "predict them into separate folders")
        if output.resolve() == resolved or same_file(output, resolved):  # also a hard link or symlink to it
            raise InputError(f"output {output} would replace its input {name}; choose another output folder")
        jobs[output.name] = FileJob(name, output)
    existing = [job for job in jobs.values() if job.output.exists()]
    if existing and not (overwrite or skip_existing):
        raise OutputExistsError(f"{len(existing)} of the outputs already exist in {output_dir} (first: "
                                f"{existing[0].output.name}); pass overwrite=True, or skip_existing=True to do only the rest")
    skipped = existing if skip_existing and not overwrite else []
    return [job for job in jobs.values() if job not in skipped], skipped


def failure_line(source: str, error: str) -> str:
    """The report line of a file that failed, naming it once: most errors start with the path."""
    return f"failed: {error}" if source in error else f"failed: {source}: {error}"


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, SegkitError) else f"{type(exc).__name__}: {text}"


def count_file_tiles(jobs: Sequence[FileJob], geometry: Geometry, tile: int, *,
                     view: Callable[[Any], Any] | None = None) -> tuple[dict[FileJob, int], list[FileOutcome]]:
    """Tiles per readable file (for one progress bar over all files) and the files that cannot be opened.
    `view`: the stack as the model sees it (`segkit.inference.api.model_view`: resampled for a model of
    another pixel size or a training scale), so the count is the tiles the model runs."""
    counts: dict[FileJob, int] = {}
    failed: list[FileOutcome] = []
    for job in jobs:
        try:
            with open_stack(job.source) as stack:
                counts[job] = count_tiles(view(stack) if view is not None else stack, geometry, tile)
        except Exception as exc:  # reported per file; the others go on
            failed.append(FileOutcome(job, _reason(exc)))
    return counts, failed


def predict_files(jobs: Sequence[FileJob], predict_one: Callable[[FileJob], Any], *,
                  echo: Callable[[str], Any] = print) -> list[FileOutcome]:
    """`predict_one(job)` for each file, one after the other (each writes its output atomically).

    A file that fails (unreadable, truncated, wrong type, ...) is reported through `echo` and
    skipped; its output is not written, and the other files carry on. `Cancelled` stops them all.
    """
    outcomes: list[FileOutcome] = []
    for job in jobs:
        try:
            predict_one(job)
            outcomes.append(FileOutcome(job))
        except Cancelled:  # the user stopped the run: not a failure of this file, and no later file starts
            raise
        except Exception as exc:  # reported per file; the others go on
            outcomes.append(FileOutcome(job, _reason(exc)))
            echo(failure_line(job.source, outcomes[-1].error or ""))
    return outcomes
