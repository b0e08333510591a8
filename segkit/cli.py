"""The `segkit` command line: parses options, calls the library, prints. No logic of its own.

User errors (SegkitError) print as one line and exit with code 2; Ctrl-C and SIGTERM (SLURM, `kill`)
stop a command the same way (unfinished files removed) with one "interrupted" line and exit code 130
or 143; anything else keeps its traceback, because it is a bug.

Only what the options and the light helpers need is imported here; each command imports the modules
it runs (training, prediction, export, ...: torch, YAML and their kin) inside itself, so `segkit --help`
and `segkit CMD --help` load no torch and stay fast.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from segkit.errors import SegkitError
from segkit.inference.options import (
    DENOISER_OUTPUT_TYPES,
    SEGMENTER_OUTPUT_TYPES,
    TTA,
    Amp,
    Blend,
    Compile,
    EngineChoice,
    Normalize,
    PredictOptions,
)
from segkit.inference.progress import ProgressBar
from segkit.io.outputs import atomic_path, check_output
from segkit.io.tiff import COMPRESSIONS, open_stack
from segkit.models import list_models, model_summary
from segkit.record import LABELS_KINDS, InferenceDefaults
from segkit.version import __version__
from segkit.words import counted

#: A library setting as a Python keyword: `overwrite=True`, `device='cpu'`, `opset=12`, `slices=(20, 25)`;
#: not a recipe key (`train.out=...`) nor part of a longer name.
_SETTING = re.compile(r"""(?<![\w.-])([a-z][a-z0-9_]*)=(True\b|'[^']*'|"[^"]*"|\(\w+, \w+\)|[^\s,;:()'"]+)""")


def cli_message(text: str, options: set[str], *, recipe: bool = False) -> str:
    """A library message (which names settings as Python keywords) in the words of the command line.

    For the names in `options` (the invoked command's option names): `name=True` -> `--name`,
    `name=value` or `name='value'` -> `--name value`, `name=(a, b)` -> `--name a:b`, with
    underscores as hyphens; `name=False`/`None` and other names stay. "use tile 556 or 572" names
    the --tile flag, or with `recipe` (training) the recipe key data.tile.
    """
    def flag(match: re.Match[str]) -> str:
        name, value = match.groups()
        if name not in options or value in ("False", "None"):
            return match.group(0)
        option = "--" + name.replace("_", "-")
        if value == "True":
            return option
        if value[0] in "'\"":
            value = value[1:-1]
        elif value[0] == "(":
            value = ":".join(part.strip() for part in value[1:-1].split(","))
        return f"{option} {value}"

    text = _SETTING.sub(flag, text)
    if recipe:
        return text.replace("use tile ", "use data.tile ")
    return text.replace("use tile ", "use --tile ") if "tile" in options else text


def option_names(command: click.Command | None) -> set[str]:
    """The Python names of a command's options (`skip_existing` for --skip-existing)."""
    return {param.name for param in command.params if isinstance(param, click.Option) and param.name} if command else set()


def _is_recipe_command(name: str) -> bool:
    return name.startswith("train")


def _cli_echo(*, err: bool = False) -> Callable[[str], None]:
    """click.echo for the library's progress lines (`echo`, `report`), in the running command's words.

    The options are read here, in the command, so the function also works from other threads."""
    ctx = click.get_current_context()
    options, recipe = option_names(ctx.command), _is_recipe_command(ctx.info_name or "")
    return lambda text: click.echo(cli_message(text, options, recipe=recipe), err=err)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, SLURM's scancel or time limit), raised in the main thread as Ctrl-C raises
    KeyboardInterrupt: every command then stops as on Ctrl-C (atomic writes delete their temporary
    files, training keeps its last checkpoint)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises Terminated while the CLI runs; the previous handler is restored after. Only
    in the main thread (the only one Python delivers signals to), and not where SIGTERM is ignored."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


#: Exit codes of an interrupted command, as a shell reports a process killed by the signal (128 + number).
EXIT_INTERRUPTED = 130  # SIGINT, Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM


class SegkitGroup(click.Group):
    """A group that turns SegkitError into a one-line message and exit code 2, and Ctrl-C or
    SIGTERM into one "interrupted" line and exit code 130 or 143.

    Library messages name settings as Python keywords ("pass overwrite=True", "use tile 556 or
    572"); cli_message gives them the names the user types: the flags of the invoked command, or
    the recipe key data.tile for training.
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        with _sigterm_as_interrupt():
            return super().main(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SegkitError as exc:
            name = ctx.invoked_subcommand or ""
            options = option_names(self.get_command(ctx, name) if name else None)
            click.echo(f"error: {cli_message(str(exc), options, recipe=_is_recipe_command(name))}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt as exc:  # the command has cleaned up on its way out (as on Ctrl-C)
            how, code = ("SIGTERM", EXIT_TERMINATED) if isinstance(exc, Terminated) else ("Ctrl-C", EXIT_INTERRUPTED)
            if how == "Ctrl-C" and sys.stderr.isatty():
                click.echo(err=True)  # end the line the terminal's ^C (or a progress bar) left open
            command = f"segkit {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "segkit"
            click.echo(f"interrupted by {how}: {command} stopped (exit code {code})", err=True)
            ctx.exit(code)


@click.group(cls=SegkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="segkit")
def main() -> None:
    """segkit: biomedical image segmentation with seamless overlap-tile inference.

    \b
    Quick start:
      segkit demo                                   # bundled model on a bundled EM crop
      segkit predict stack.tif -o membranes.tif     # membrane probabilities of a stack
      segkit evaluate membranes.tif labels.tif      # pixel error, adapted Rand, VI
      segkit segment membranes.tif -o neurons.tif   # neuron instances (seeded watershed)
      segkit train recipes/em_neurons.yaml          # train the U-Net on ISBI 2012
      segkit init my_data/                          # a recipe for your own images/ + labels/
      segkit models                                 # registered architectures and their geometry
      segkit export best.safetensors -o unet.onnx   # ONNX for onnxruntime (--engine onnx)
      segkit predict big.tif -o big.ome.zarr --workers 4   # Dask, OME-Zarr, resumable
      segkit train-denoiser recipes/denoise_em.yaml # a denoising pre-stage from raw data
      segkit denoise noisy.tif -m den.safetensors   # denoise a stack
    """


# -- train ---------------------------------------------------------------------------------

@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("recipe", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue the run in train.out from its last checkpoint.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def train(recipe: Path, overrides: tuple[str, ...], resume: bool, quiet: bool) -> None:
    """Train a model from a YAML RECIPE, with optional section.key=value OVERRIDES.

    RECIPE may also be a data folder (images/ + labels/, or an image stack and its label stack): `segkit
    init` then writes its recipe into the run folder (train.out, default runs/<folder name>) as
    init_recipe.yaml, and training starts from it. The OVERRIDES apply to it; train.device,
    train.time_limit_min, data.labels_kind, data.raw and data.labels also steer init (device, budget,
    label kind, which files).

    \b
    Examples:
      segkit train recipes/em_neurons.yaml
      segkit train recipes/em_neurons.yaml train.epochs=2 data.root=../shared/data/isbi2012
      segkit train recipes/em_neurons.yaml --resume
      segkit train recipes/nuclei_bbbc039_cpu.yaml          # your own images/ + labels/ + train.txt ...
      segkit train recipes/axon_myelin_sem.yaml data.root=/data/sem train.device=cuda
      segkit train my_data/                                 # segkit init my_data/, then train its recipe
      segkit train my_data/ train.time_limit_min=60 train.device=cuda
    """
    from segkit.config import load_recipe
    from segkit.training.ddp import ranks_from_environment
    from segkit.training.loop import train as run_training

    if recipe.is_dir():
        if ranks_from_environment().distributed:  # N processes would each write the recipe
            raise SegkitError(f"{recipe} is a data folder: with several processes train a recipe file; write it "
                              f"first (segkit init {recipe}), then start torchrun or srun with that file")
        recipe = _init_for_training(recipe, overrides, resume)
    resolved = load_recipe(recipe, overrides)
    files = run_training(resolved, resume=resume, progress=not quiet, echo=_cli_echo())
    if ranks_from_environment().main:  # under torchrun or srun, rank 0 speaks for all
        click.echo(cli_message(files.summary(), {"resume"}))


def _init_for_training(data: Path, overrides: tuple[str, ...], resume: bool) -> Path:
    """`segkit train DATA`: the run folder's init_recipe.yaml, written by segkit init (kept when resuming)."""
    from segkit.config import apply_overrides
    from segkit.training.init import init_recipe
    from segkit.training.runs import open_run

    raw = apply_overrides({}, list(overrides))
    given = lambda section, key: (raw.get(section) or {}).get(key)  # noqa: E731
    out = given("train", "out") or f"runs/{data.resolve().name}"
    new_folder = not Path(out).exists()
    files = open_run(out, resume=resume)  # a finished run is refused before any work
    recipe = files.root / "init_recipe.yaml"
    if resume and recipe.is_file():
        click.echo(f"resuming with {recipe} (written by segkit init for this run)")
        return recipe
    try:
        init_recipe(data, recipe, minutes=given("train", "time_limit_min"), device=given("train", "device") or "auto",
                    kind=given("data", "labels_kind"), images=given("data", "raw"), labels=given("data", "labels"),
                    overwrite=True, overrides=overrides, out=out, echo=_cli_echo(),
                    settings={"device": "train.device", "kind": "data.labels_kind", "minutes": "train.time_limit_min",
                              "images": "data.raw", "labels": "data.labels"})
    except BaseException:
        if new_folder and files.root.is_dir() and not any(files.root.iterdir()):
            files.root.rmdir()  # no empty run folder is left by data that could not be read
        raise
    return recipe


# -- init ----------------------------------------------------------------------------------

@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, show_default="./<DATA name>.yaml",
              help="The recipe to write (.yaml); split files, when DATA has none, are written beside it.")
@click.option("--minutes", type=float, default=None, show_default="20 on a CPU, 60 on a GPU",
              help="Time budget of the training run: epochs and iterations are sized to fill it.")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N: the device to train on (its speed is measured here).")
@click.option("--kind", type=click.Choice(list(LABELS_KINDS)), default=None,
              show_default="guessed from the labels", help="The label kind (refused when the labels contradict it).")
@click.option("--images", default=None,
              help="The images in DATA: a folder (paired with --labels by file name) or one stack file "
                   "(default: images/, else the stack sharing the label stack's size and name).")
@click.option("--labels", default=None,
              help="The labels in DATA: a folder or one stack file (default: labels/, else the TIFF named *label*).")
@click.option("--no-measure", is_flag=True,
              help="Do not time training on the device: size the run from nominal timings (quick, less exact).")
@click.option("--overwrite", is_flag=True, help="Replace an existing recipe file.")
def init(data: Path, output: Path | None, minutes: float | None, device: str, kind: str | None, images: str | None,
         labels: str | None, no_measure: bool, overwrite: bool) -> None:
    """Read the data folder DATA, print its fingerprint, and write a complete, commented recipe that
    `segkit train` runs as it is.

    DATA holds images/ and labels/ (the same file names; optional train.txt, val.txt, test.txt), or one
    image stack and its label stack (e.g. train-volume.tif + train-labels.tif). Every choice (label kind,
    split, normalisation, pixel size and scale, model, tiles, epochs and iterations for the time budget)
    is written with its reason. Three training iterations are timed on the device (--no-measure: not).

    \b
    Examples:
      segkit init my_data/                                   # writes my_data.yaml (+ split files if needed)
      segkit train my_data.yaml
      segkit init ../shared/data/isbi2012 -o isbi.yaml --minutes 30 --device cpu
      segkit init my_data/ --device cuda --kind instances    # budget 60 min on a GPU
      segkit init stacks/ --images raw.tif --labels labels.tif
      segkit train my_data/                                  # init into the run folder, then train
    """
    from segkit.training.init import init_recipe

    result = init_recipe(data, output, minutes=minutes, device=device, kind=kind, images=images, labels=labels,
                         overwrite=overwrite, measure=not no_measure, echo=_cli_echo())
    click.echo(f"train it with: segkit train {result.recipe}")


# -- predict -------------------------------------------------------------------------------

def _progress(quiet: bool, unit: str = "tile") -> ProgressBar:
    """The command's progress bar (text on stderr), drawn from its first reset (the total is known then) and
    ended once; none with --quiet."""
    return ProgressBar(unit, disable=quiet)


COMPRESSION_OPTION = click.option(
    "--compression", type=click.Choice(COMPRESSIONS), default="zlib", show_default=True,
    help="TIFF compression of the output, done in parallel on all cores. zlib opens everywhere (ImageJ/Fiji, "
         "napari, Python); zstd is faster and smaller but ImageJ cannot read it, so it is written as OME-TIFF "
         "(Bio-Formats opens it); none writes fastest and largest.")


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--output", default=None,
              help="Output TIFF (default: <input>_membranes.tif beside the input), or a folder (existing, "
                   "ending in /, or any path not ending in .tif with several inputs) for one output per input file.")
@click.option("-m", "--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Checkpoint (.safetensors) from `segkit train`, an .onnx file from `segkit export`, a bioimage.io "
                   "package, or demo: the bundled U-Net (the default; a file named demo here wins).")
@click.option("--engine", type=click.Choice(EngineChoice.values()), default="auto", show_default=True,
              help="torch, or onnx (ONNX Runtime: TensorRT > CUDA > CPU). auto: onnx for .onnx files, else torch. "
                   "onnx with a checkpoint exports it (verified) for this run.")
@click.option("--denoise", "denoiser_path", type=click.Path(path_type=Path), default=None,
              help="Denoiser checkpoint (`segkit train-denoiser`) to run in front of the segmenter.")
@click.option("--tile", default=None, show_default="the model's, else 572",
              help="Input tile size; must be a valid size of the model (572 -> 388 output for the U-Net, "
                   "a multiple of 32 for FCN and smp models). 'auto': measure sizes and batches on this "
                   "device and take the fastest that fits in memory.")
@click.option("--compile", "compile_model", type=click.Choice(Compile.values()), default="auto", show_default=True,
              is_flag=False, flag_value="on",
              help="torch.compile the model (torch engine): auto on CUDA GPUs only, on (also a bare --compile), off. "
                   "Compiled kernels are cached in ~/.cache/segkit (SEGKIT_CACHE_DIR), so later runs start fast.")
@click.option("--blend", type=click.Choice(Blend.values()), default="cosine", show_default=True,
              help="Window that blends overlapping tiles of same-padding models (FCN, smp).")
@click.option("--halo", type=click.IntRange(min=0), default=None,
              help="Override the context (px) added around tiles of same-padding models.")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              show_default="GPU: from the free memory (or measured with --tile auto); CPU: 4",
              help="Tiles per forward pass (halved automatically when the GPU runs out of memory).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", type=click.Choice(Amp.values()), default="auto", show_default=True,
              help="Autocast precision of the forward pass. auto: bf16 on GPUs that have it, else fp16; none on "
                   "the CPU. none keeps full precision. onnx: fp16 runs an fp16 graph.")
@click.option("--output-type", type=click.Choice([str(t) for t in SEGMENTER_OUTPUT_TYPES]), default="uint8", show_default=True,
              help="Membrane probability as uint8 (0-255) or float16 (in a TIFF stored as float32: ImageJ and "
                   "OME-TIFF have no 16-bit float).")
@click.option("--threshold", default=None,
              help="Write a binary 0/255 membrane mask at this threshold, or 'auto' for the checkpoint's "
                   "(chosen on validation slices during training).")
@click.option("--normalize", type=click.Choice(Normalize.values()), default="auto", show_default=True,
              help="Intensity statistics: the checkpoint's (training data), or computed once for this stack. "
                   "auto uses the checkpoint's unless the input dtype differs from the training data.")
@click.option("--tta", type=click.Choice(TTA.values()), default="none", show_default=True,
              help="Test-time augmentation: average over 4 flips or the 8 flips/rotations (one batched forward each).")
@click.option("--instances", is_flag=True,
              help="Write uint32 neuron instances (seeded watershed per slice, `segkit segment`) instead of "
                   "probabilities; --threshold sets the watershed's interior threshold.")
@click.option("--class", "class_index", type=click.IntRange(min=0), default=None,
              help="Models of several classes (semantic or instance labels): write only this class's probability "
                   "(or, with --threshold, its mask). Default for them: every class's probability as a channel axis "
                   "(CZYX), or objects for models trained on instance labels.")
@click.option("--argmax", is_flag=True, help="Models of several classes: write the most probable class (uint8 0..K-1).")
@click.option("--scheduler", default=None,
              help="Run on this Dask cluster (tcp://host:8786); the output must be an .ome.zarr store.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Run on a local Dask cluster of N worker processes; the output must be an .ome.zarr store.")
@click.option("--chunk", type=click.IntRange(min=1), default=1024, show_default=True,
              help="OME-Zarr chunk (px, rounded up to the model step); one Dask task per chunk.")
@click.option("--resume", is_flag=True, help="OME-Zarr: finish an interrupted run, skipping chunks already written.")
@COMPRESSION_OPTION
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--skip-existing", is_flag=True, help="With an output folder: leave inputs whose output exists.")
@click.option("--trust-model-code", is_flag=True,
              help="Let a bioimage.io package run its own Python code (TorchScript, an architecture file); without "
                   "it segkit runs only the package's weights (ONNX).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def predict(sources: tuple[str, ...], output: str | None, model_path: Path | None, engine: str,
            denoiser_path: Path | None, tile: str | None, compile_model: str, blend: str, halo: int | None,
            batch: int | None, device: str,
            amp: str, output_type: str, threshold: str | None, normalize: str, tta: str, instances: bool,
            class_index: int | None, argmax: bool, scheduler: str | None, workers: int | None, chunk: int, resume: bool, compression: str,
            overwrite: bool, skip_existing: bool, trust_model_code: bool, quiet: bool) -> None:
    """Predict membrane probabilities of SOURCES: a TIFF stack, a folder or quoted glob of 2D TIFFs
    (read as one stack), or many files into an output folder (one output each).

    \b
    Examples:
      segkit predict big_stack.tif --tile 572 -o big_stack_membranes.tif
      segkit predict big_stack.tif -m runs/em_neurons/best.safetensors --batch 16 --amp fp16
      segkit predict 'sections/*.tif' -o mask.tif --threshold auto
      segkit predict 'dir/*.tif' -o outdir/ --engine onnx -m model.onnx
      segkit predict big_stack.tif --tile auto --device cuda   # GPU: bf16/fp16 and the batch chosen for you
      segkit predict big_stack.tif -o out.tif --compression zstd --amp none
      segkit predict stack.tif --tta d4 --instances -o neurons.tif
      segkit predict noisy.tif --denoise runs/denoise_em/best.safetensors -o membranes.tif
      segkit predict big.tif -o big.ome.zarr --workers 4          # Dask, OME-Zarr, resumable
      segkit predict big.tif -o big.ome.zarr --scheduler tcp://host:8786 --resume
      segkit predict nuclei/ -o labels/ -m runs/nuclei_bbbc039/best.safetensors   # objects, one file each
      segkit predict sem.tif -m runs/axon_myelin_sem/best.safetensors --argmax -o classes.tif
    """
    from segkit.inference.api import predict as run_prediction

    options = PredictOptions(
        engine=engine, denoise=denoiser_path, tile=_tile_option(tile), batch=batch, device=device, amp=amp,
        compile_model=compile_model, blend=blend, halo=halo, output_type=output_type, threshold=threshold,
        normalize=normalize, tta=tta, instances=instances, class_index=class_index, argmax=argmax,
        compression=compression, workers=workers, scheduler=scheduler, chunk=chunk, resume=resume,
        overwrite=overwrite, skip_existing=skip_existing, trust_model_code=trust_model_code)
    with _progress(quiet) as bar:
        result = run_prediction(sources, output, model=model_path, options=options, report=_cli_echo(err=True),
                                progress=bar)
    _print_result(result)


def _print_result(result: Any) -> None:
    """`wrote PATH`, or for an output folder a count and the failures (exit code 1 when any failed)."""
    if result.folder is None:
        click.echo(f"wrote {result.outputs[0]}")
        return
    total = len(result.outputs) + len(result.failed)
    click.echo(f"wrote {len(result.outputs)} of {counted(total, 'file')} to {result.folder}"
               + (f"; {len(result.failed)} failed: " + ", ".join(Path(s).name for s, _ in result.failed)
                  if result.failed else ""))
    if result.failed:
        raise click.exceptions.Exit(1)


def _tile_option(text: str | None) -> int | str | None:
    """--tile as a number or 'auto'."""
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise SegkitError(f"--tile {text!r} must be a whole number of pixels or 'auto'") from None


def _watershed_params(inference: Any, threshold: str | None, **overrides: Any) -> Any:
    """The checkpoint's watershed defaults (`evaluate --write-defaults`), then the command line's."""
    from segkit.inference.encodings import membrane_encoding

    return membrane_encoding(inference, threshold=threshold, instances=True, watershed=overrides).params


def _bundled_or_path(checkpoint: Path, output: Path | None, suffix: str) -> tuple[Path, Path | None]:
    """A command's CHECKPOINT as a file (demo: the bundled U-Net's), and its default output for the bundled
    U-Net (demo.onnx here, not beside the installed file); other defaults are the command's own."""
    from segkit.inference.loading import BUNDLED_MODEL, names_bundled_model, resolve_model

    if names_bundled_model(checkpoint):
        return resolve_model(checkpoint), output if output is not None else Path(BUNDLED_MODEL + suffix)
    return checkpoint, output


# -- export --------------------------------------------------------------------------------

@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="ONNX file to write (default: the checkpoint's name with .onnx; for demo, ./demo.onnx).")
@click.option("--with-denoiser", "denoiser_path", type=click.Path(path_type=Path), default=None,
              help="Denoiser checkpoint to put in front of the segmenter, in the same graph.")
@click.option("--tile", type=int, default=None, show_default="the checkpoint's, else 572",
              help="Tile the graph is verified at (and fixed to, with --fixed-tile); also the default tile of "
                   "`segkit predict model.onnx`.")
@click.option("--fp16", is_flag=True, help="fp16 weights and activations inside the graph (input/output stay float32).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (13-20).")
@click.option("--fixed-tile", is_flag=True,
              help="Fix height and width to --tile (only the batch axis dynamic), as TensorRT prefers.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def export(checkpoint: Path, output: Path | None, denoiser_path: Path | None, tile: int | None, fp16: bool,
           opset: int, fixed_tile: bool, overwrite: bool) -> None:
    """Export a CHECKPOINT (segmenter or denoiser, or demo: the bundled U-Net) to ONNX for
    `segkit predict --engine onnx`.

    The graph has a dynamic batch axis (and dynamic height/width unless --fixed-tile), returns the
    membrane probability (denoisers: intensities), passes onnx.checker and is compared with torch
    on random and real EM input before it is written; the model's geometry, normalisation and
    classes travel in its metadata.

    \b
    Examples:
      segkit export runs/em_neurons/best.safetensors -o unet.onnx
      segkit export demo                                   # the bundled U-Net -> demo.onnx
      segkit export best.safetensors -o unet_fp16.onnx --fp16 --tile 572 --fixed-tile
      segkit export seg.safetensors --with-denoiser den.safetensors -o denoised_unet.onnx
    """
    from segkit.checkpoint import load_model, read_info
    from segkit.export import export_onnx, write_onnx
    from segkit.inference.loading import trained_tile
    from segkit.models.compose import compose_with_denoiser

    checkpoint, output = _bundled_or_path(checkpoint, output, ".onnx")
    output = output or checkpoint.with_suffix(".onnx")
    check_output(output, kind="onnx", inputs=[checkpoint, denoiser_path], overwrite=overwrite, report=_cli_echo(err=True))
    if denoiser_path is not None:
        model, info = compose_with_denoiser(denoiser_path, checkpoint)
    else:
        model, info = load_model(checkpoint, expect_kind=read_info(checkpoint).kind)
    tile = tile or trained_tile(info, info.geometry)
    onnx_bytes, record = export_onnx(model, info, tile=tile, fp16=fp16, opset=opset, fixed_tile=fixed_tile)
    written = write_onnx(onnx_bytes, output, overwrite=overwrite)
    worst = max(v for k, v in record.parity.items() if k.startswith("max_abs_diff"))
    axes = f"tile {tile} fixed" if fixed_tile else f"any valid tile, verified at {tile}"
    click.echo(f"wrote {written} ({len(onnx_bytes) / 1e6:.1f} MB, {record.precision}, opset {opset}, {axes}); "
               f"max abs difference from torch {worst:.1e}")


# -- denoisers ------------------------------------------------------------------------------

@main.command("train-denoiser")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue the run in train.out from its last checkpoint.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def train_denoiser(recipe: Path, overrides: tuple[str, ...], resume: bool, quiet: bool) -> None:
    """Train a denoiser from a YAML RECIPE on raw (unlabelled) data, with section.key=value OVERRIDES.

    \b
    Examples:
      segkit train-denoiser recipes/denoise_em.yaml
      segkit train-denoiser recipes/denoise_em.yaml train.mode=blind_spot corruption.noise=poisson_gaussian
    """
    from segkit.config import DENOISE_SCHEMA, load_recipe
    from segkit.training.denoise_loop import train_denoiser as run_training

    resolved = load_recipe(recipe, overrides, schema=DENOISE_SCHEMA)
    files = run_training(resolved, resume=resume, progress=not quiet, echo=_cli_echo())
    click.echo(cli_message(files.summary(), {"resume"}))


@main.command()
@click.argument("source")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output TIFF (default: <input>_denoised.tif beside the input).")
@click.option("-m", "--model", "model_path", type=click.Path(path_type=Path), required=True,
              help="Denoiser checkpoint from `segkit train-denoiser`, or its .onnx from `segkit export`.")
@click.option("--engine", type=click.Choice(EngineChoice.values()), default="auto", show_default=True,
              help="torch or onnx (ONNX Runtime); auto: onnx for .onnx files, else torch.")
@click.option("--tile", type=int, default=None, show_default="the model's", help="Input tile size (a valid size).")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              show_default="GPU: from the free memory; CPU: 4", help="Tiles per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", type=click.Choice(Amp.values()), default="auto", show_default=True,
              help="Autocast precision of the forward pass (auto: bf16/fp16 on a GPU, none on the CPU).")
@click.option("--output-type", type=click.Choice([str(t) for t in DENOISER_OUTPUT_TYPES]), default="same", show_default=True,
              help="Store denoised intensities in the input's dtype (rounded, clipped) or as float32.")
@COMPRESSION_OPTION
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def denoise(source: str, output: Path | None, model_path: Path, engine: str, tile: int | None, batch: int | None,
            device: str, amp: str, output_type: str, compression: str, overwrite: bool, quiet: bool) -> None:
    """Denoise SOURCE (TIFF, folder or quoted glob of 2D TIFFs) with a trained denoiser, streaming.

    \b
    Examples:
      segkit denoise noisy_stack.tif -m runs/denoise_em/best.safetensors -o clean_stack.tif
      segkit denoise noisy_stack.tif -m den.safetensors --output-type float32 --batch 16 --device cuda
      segkit denoise noisy_stack.tif -m den.onnx -o clean_stack.tif
    """
    from segkit.inference.api import predict as run_prediction

    options = PredictOptions(engine=engine, tile=tile, batch=batch, device=device, amp=amp, kind="denoiser",
                             output_type=output_type, compression=compression, overwrite=overwrite)
    with _progress(quiet) as bar:
        result = run_prediction(source, output, model=model_path, options=options, report=_cli_echo(err=True),
                                progress=bar)
    _print_result(result)


# -- segment -------------------------------------------------------------------------------

@main.command()
@click.argument("source")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output uint32 label TIFF (default: <input>_instances.tif beside the input).")
@click.option("-m", "--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Checkpoint (or .onnx file, package, or demo: the bundled U-Net) whose watershed defaults "
                   "(from `segkit evaluate --write-defaults`) to use.")
@click.option("--threshold", default=None, show_default="the checkpoint's, else 0.5",
              help="Probability below which pixels are interior (seeds come from the interior); 'auto': the checkpoint's.")
@click.option("--seed-distance", type=click.FloatRange(min=0), default=None, show_default="2",
              help="Seeds are interior pixels at least this far (px) from predicted membrane.")
@click.option("--min-seed-size", type=click.IntRange(min=1), default=None, show_default="10", help="Smallest seed (px).")
@click.option("--min-size", type=click.IntRange(min=0), default=None, show_default="50",
              help="Segments smaller than this (px) are merged into their neighbours.")
@COMPRESSION_OPTION
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def segment(source: str, output: Path | None, model_path: Path | None, threshold: str | None,
            seed_distance: float | None, min_seed_size: int | None, min_size: int | None, compression: str,
            overwrite: bool, quiet: bool) -> None:
    """Neuron instances of a membrane probability stack SOURCE: seeded watershed per slice, uint32 labels
    whose ids are unique across the stack (each slice's continue after the slice before it).

    Seeds are the interior pixels far enough from predicted membrane; segments grow over the
    probability and meet on membranes, so a one-pixel gap does not merge two cells.

    \b
    Examples:
      segkit segment membranes.tif -o neurons.tif
      segkit segment membranes.tif -m runs/em_neurons/best.safetensors --overwrite
      segkit segment membranes.tif -m demo          # the bundled U-Net's settings (for its own probabilities)
      segkit segment membranes.tif --threshold 0.6 --seed-distance 4 --min-size 100
    """
    from segkit.inference.api import default_output
    from segkit.inference.loading import model_info
    from segkit.inference.segment import segment_stack

    output = output or default_output(source, "instances")
    check_output(output, kind="tiff", inputs=[source], overwrite=overwrite, report=_cli_echo(err=True))
    inference = model_info(model_path).inference if model_path is not None else InferenceDefaults()
    if threshold == "auto" and model_path is None:
        raise SegkitError("--threshold auto takes the checkpoint's threshold; pass -m CHECKPOINT")
    params = _watershed_params(inference, threshold, seed_distance=seed_distance, min_seed_size=min_seed_size,
                               min_size=min_size)
    with open_stack(source, labels=True) as stack:  # label dtypes are refused by segment_stack, with a clear message
        planes = len(stack)
    with _progress(quiet, "slice") as bar:
        bar.reset(total=planes)
        written = segment_stack(source, output, params, overwrite=overwrite, on_plane=bar.update,
                                compression=compression)
    click.echo(f"wrote {written} (uint32 ids unique across the stack; watershed: {params.to_dict()})")


# -- convert -------------------------------------------------------------------------------

@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@COMPRESSION_OPTION
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--labels", is_flag=True, help="Write the store's label image (labels/: instances, objects or classes) "
                                             "instead of its image (the probabilities).")
def convert(store: Path, output: Path, compression: str, overwrite: bool, labels: bool) -> None:
    """Convert an OME-Zarr STORE (from `segkit predict -o x.ome.zarr`) to a TIFF OUTPUT (ImageJ hyperstack, OME-TIFF above 4 GiB), streaming.

    \b
    Example:
      segkit convert big.ome.zarr big_membranes.tif
      segkit convert big.ome.zarr big_membranes.tif --compression zstd
      segkit convert big.ome.zarr big_instances.tif --labels      # the store's labels/ (instances, objects, classes)
    """
    from segkit.io.zarr import convert_zarr_to_tiff

    click.echo(f"wrote {convert_zarr_to_tiff(store, output, overwrite=overwrite, compression=compression, report=_cli_echo(err=True), labels=labels)}")


# -- evaluate ------------------------------------------------------------------------------

def _parse_slices(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise SegkitError(f"--slices {text!r} must look like START:STOP, e.g. 25:30") from None
    if not 0 <= start < stop:
        raise SegkitError(f"--slices {text!r}: need 0 <= START < STOP")
    return start, stop


@main.command()
@click.argument("prediction")
@click.argument("labels")
@click.option("-m", "--model", type=click.Path(path_type=Path), default=None,
              help="Score at the threshold (and, with --watershed, the watershed settings) stored in this model: a "
                   "checkpoint, .onnx file, bioimage.io package, or demo (the bundled U-Net).")
@click.option("--threshold", default=None, show_default="the model's with -m, else 0.5",
              help="Membrane probability threshold, or 'auto' for the one stored in the -m model.")
@click.option("--sweep", is_flag=True, help="Also try thresholds 0.05..0.95 and report the best by adapted Rand error.")
@click.option("--slices", default=None, help="Evaluate only slices START:STOP of the label stack (e.g. 25:30).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the scores as JSON to this file ('-' for stdout only).")
@click.option("--instances", is_flag=True, help="PREDICTION is an instance label stack (segment/predict --instances).")
@click.option("--watershed", is_flag=True,
              help="Score watershed instances of the probabilities instead of connected components; with --sweep, "
                   "sweep the watershed's threshold and seed distance.")
@click.option("--write-defaults", "write_defaults", type=click.Path(path_type=Path), default=None,
              help="Store the best sweep setting in this checkpoint's inference defaults (needs --sweep and "
                   "--slices on the recipe's validation slices).")
@click.option("--labels-kind", type=click.Choice(list(LABELS_KINDS)), default="membrane",
              show_default=True,
              help="What LABELS hold: ISBI membrane labels; semantic classes 0..K-1 (PREDICTION: a class map, "
                   "e.g. predict --argmax; needs --classes); or object ids, 0 = background (PREDICTION: object "
                   "labels; matched precision/recall/F1 and AP at IoU 0.5-0.95).")
@click.option("--classes", type=click.IntRange(min=2), default=None, help="--labels-kind semantic: K.")
@click.option("--ignore", "ignore_index", type=int, default=None,
              help="--labels-kind semantic: a label value left out of the scores.")
def evaluate(prediction: str, labels: str, model: Path | None, threshold: str | None, sweep: bool, slices: str | None,
             json_path: Path | None, instances: bool, watershed: bool, write_defaults: Path | None, labels_kind: str,
             classes: int | None, ignore_index: int | None) -> None:
    """Score a membrane PREDICTION against ISBI-style LABELS (0 = membrane, >0 = cell).

    PREDICTION first (what segkit wrote), LABELS second (the ground truth). Truth-first tools order
    them the other way: skimage's adapted_rand_error(image_true, image_test), StarDist's
    matching(y_true, y_pred).

    Reports pixel error, adapted Rand error and variation of information (split + merge) of the
    connected components of the thresholded prediction, plus membrane Dice/IoU, averaged per slice,
    at the threshold it prints with its origin: --threshold, else the one stored in the -m model, else 0.5.

    \b
    Examples:
      segkit evaluate membranes.tif labels.tif -m runs/em_neurons/best.safetensors   # its stored threshold
      segkit evaluate segkit-demo/prediction.tif segkit/data/isbi_test_labels.tif -m demo   # as segkit demo
      segkit evaluate membranes.tif train-labels.tif --slices 25:30 --sweep --json scores.json
      segkit evaluate neurons.tif train-labels.tif --slices 25:30 --instances
      segkit evaluate val_membranes.tif train-labels.tif --slices 20:25 --sweep --watershed \\
          --write-defaults runs/em_neurons/best.safetensors
      segkit evaluate nuclei_labels.tif true_labels.tif --labels-kind instances
      segkit evaluate classes.tif axon_myelin_labels.tif --labels-kind semantic --classes 3
    """
    from segkit.evaluation import (
        evaluate_instances,
        evaluate_stacks,
        evaluate_watershed,
        membrane_threshold,
        sweep_watershed,
    )

    chosen = _parse_slices(slices)
    _check_json_output(json_path, prediction, labels)
    if json_path is None or str(json_path) != "-":  # `--json -` prints JSON only (its keys say which is which)
        click.echo(evaluate_header(prediction, labels))
    probability_options = sweep or watershed or write_defaults is not None or model is not None or threshold is not None
    if labels_kind != "membrane":
        _evaluate_kind(prediction, labels, labels_kind, classes=classes, ignore=ignore_index, slices=chosen,
                       json_path=json_path, other=instances or probability_options)
        return
    if write_defaults is not None and not (sweep and chosen):
        raise SegkitError("--write-defaults stores the best setting of a sweep: add --sweep and --slices (validation)")
    if instances and probability_options:
        raise SegkitError("--instances scores finished label stacks; --threshold, -m (a model's threshold), --sweep "
                          "and --watershed apply to probabilities")
    if instances or watershed:
        if instances:
            report = evaluate_instances(prediction, labels, slices=chosen)
        elif sweep:
            report = sweep_watershed(prediction, labels, slices=chosen)
            report["scores"] = report["best"]["scores"]
        else:
            params, origin = _evaluate_watershed_params(model, threshold)
            report = evaluate_watershed(prediction, labels, slices=chosen, params=params)
            report["params_from"] = origin
        title = "instances" if instances else f"watershed {report.get('params', '')}"
        _report(report, json_path, title + (f" ({report['params_from']})" if "params_from" in report else ""))
        if sweep:
            best = report["best"]
            click.echo(f"best watershed setting (by adapted Rand error): {best['params']}")
            if write_defaults is not None:
                _store_defaults(write_defaults, {"watershed": best["params"]}, chosen)
        return
    value, origin = membrane_threshold(threshold, model)
    origin = "from --threshold" if origin == "given" else cli_message(origin, {"model"})
    report = evaluate_stacks(prediction, labels, threshold=value, sweep=sweep, slices=chosen)
    report["threshold_from"] = origin
    if json_path is not None and str(json_path) == "-":
        click.echo(json.dumps(report, indent=1))
        return
    click.echo(format_scores(report["scores"], f"threshold {_threshold_text(value)} ({origin})"))
    if sweep:
        best = report["sweep"]["best"]
        click.echo(format_scores(best["scores"], f"best threshold {best['threshold']} (by adapted Rand error)"))
        if write_defaults is not None:
            _store_defaults(write_defaults, {"threshold": best["threshold"]}, chosen)
    if json_path is not None:
        _write_json(json_path, report)


def _threshold_text(value: float) -> str:
    """A threshold as 0.80, or with every digit it has (0.875)."""
    return f"{value:.2f}" if abs(value - round(value, 2)) < 1e-9 else f"{value:g}"


def _evaluate_watershed_params(model: Path | None, threshold: str | None) -> tuple[Any, str]:
    """`evaluate --watershed`: the watershed settings stored in the -m model (as `segkit segment -m` uses them),
    --threshold over them; and where they come from, in words."""
    from segkit.inference.loading import BUNDLED_MODEL, model_info, names_bundled_model

    if model is None and threshold == "auto":
        raise SegkitError("--threshold auto takes the threshold stored in a model: pass -m MODEL (a checkpoint, "
                          f"package or {BUNDLED_MODEL}, the bundled U-Net)")
    inference = model_info(model).inference if model is not None else InferenceDefaults()
    name = f"{BUNDLED_MODEL}, the bundled U-Net" if names_bundled_model(model) else str(model)
    if model is None:
        origin = "the defaults; -m MODEL takes a model's stored settings"
    else:
        origin = f"stored in {name}" if inference.watershed else f"the defaults: {name} stores none"
    if threshold not in (None, "auto"):
        origin += ", threshold from --threshold"
    return _watershed_params(inference, threshold), origin


def evaluate_header(prediction: str, labels: str) -> str:
    """`segkit evaluate`'s first line: which argument is which (truth-first tools order them the other way)."""
    return f"prediction: {prediction}, labels (truth): {labels}"


def _evaluate_kind(prediction: str, labels: str, kind: str, *, classes: int | None, ignore: int | None,
                   slices: tuple[int, int] | None, json_path: Path | None, other: bool) -> None:
    """`segkit evaluate --labels-kind semantic|instances`: per-class Dice/IoU, or matched instances."""
    from segkit.evaluation import evaluate_matched_instances, evaluate_semantic

    if other:
        raise SegkitError(f"--labels-kind {kind} scores a finished class map or object labels; --instances, "
                          "--threshold, -m, --watershed, --sweep and --write-defaults apply to membrane probabilities")
    if kind == "semantic":
        if classes is None:
            raise SegkitError("--labels-kind semantic needs --classes K (labels hold 0..K-1)")
        report = evaluate_semantic(prediction, labels, classes=classes, ignore=ignore, slices=slices)
    else:
        report = evaluate_matched_instances(prediction, labels, slices=slices)
    if json_path is not None and str(json_path) == "-":
        click.echo(json.dumps(report, indent=1))
        return
    scores = report["scores"]
    if kind == "semantic":
        per_class = "  ".join(f"{k}: Dice {scores[f'dice_{k}']:.4f} IoU {scores[f'iou_{k}']:.4f}" for k in range(classes))
        click.echo(f"{counted(report['slices'], 'slice')}: mean Dice {scores['dice_mean']:.4f}  mean IoU {scores['iou_mean']:.4f}"
                   f"\n{per_class}")
    else:
        click.echo(f"{counted(report['slices'], 'slice')}: F1@0.5 {scores['f1@0.5']:.4f}  AP@0.5 {scores['ap@0.5']:.4f}  "
                   f"mean AP@0.5:0.95 {scores['map']:.4f}  precision@0.5 {scores['precision@0.5']:.4f}  "
                   f"recall@0.5 {scores['recall@0.5']:.4f}  (per-image means)")
    if json_path is not None:
        _write_json(json_path, report)


def _check_json_output(path: Path | None, *inputs: str) -> None:
    """--json FILE: a .json name in a writable folder, not one of the inputs (checked before scoring)."""
    if path is not None and str(path) != "-":
        check_output(path, kind="json", inputs=inputs, overwrite=True, report=_cli_echo(err=True))


def _write_json(path: Path, report: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    click.echo(f"wrote {path}")


def _report(report: dict[str, Any], json_path: Path | None, title: str) -> None:
    if json_path is not None and str(json_path) == "-":
        click.echo(json.dumps(report, indent=1))
        return
    click.echo(format_scores(report["scores"], title))
    if json_path is not None:
        _write_json(json_path, report)


def _store_defaults(path: Path, updates: dict[str, Any], slices: tuple[int, int]) -> None:
    from segkit.checkpoint import update_inference_defaults

    update_inference_defaults(path, updates, chosen_on=slices)
    click.echo(f"stored {updates} in {path} (inference defaults, chosen on slices {slices[0]}:{slices[1]})")


def format_scores(scores: dict[str, float], title: str) -> str:
    keys = ["pixel_error", "adapted_rand_error", "vi", "vi_split", "vi_merge", "dice", "iou"]
    return "\n".join([title] + [f"  {key:<20}{scores[key]:.4f}" for key in keys if key in scores])


# -- models --------------------------------------------------------------------------------

@main.command()
@click.option("--smp", "count_smp", is_flag=True,
              help="Also count the smp models' parameters and tiles (loads segmentation-models-pytorch: seconds).")
def models(count_smp: bool) -> None:
    """List the bundled model, by its name, and the registered architectures with their geometry and parameter
    count (default settings).

    The bundled U-Net's name, demo, works wherever a model file does: predict, segment and evaluate -m demo,
    segkit export demo, segkit package demo, segkit.predict(..., model="demo") (a file named demo in the
    working folder wins). smp models are named smp:<Arch>:<encoder>; any encoder of
    segmentation-models-pytorch works. Models are built on torch's meta device (shapes only), so listing
    them is quick; smp itself is loaded only with --smp.

    \b
    Examples:
      segkit models
      segkit models --smp
    """
    from segkit.checkpoint import read_info
    from segkit.inference.loading import BUNDLED_MODEL, default_model_path
    from segkit.memory import meta_model
    from segkit.models import SMP_PREFIX

    info = read_info(default_model_path())
    kwargs = ", ".join(f"{k} {v}" for k, v in info.model_kwargs.items() if k in ("base", "depth"))
    click.echo(f"bundled model (its name works wherever a model file does: -m {BUNDLED_MODEL}, "
               f"segkit export {BUNDLED_MODEL}, model={BUNDLED_MODEL!r}):")
    click.echo(_model_row(BUNDLED_MODEL, meta_model(info.model, info.model_kwargs),
                          f"{info.model} ({kwargs}) trained on ISBI 2012, threshold {info.inference.threshold:g} "
                          f"({default_model_path().name})"))
    click.echo("architectures (model.name in a recipe), default settings:")
    for name in list_models():
        if name.startswith(SMP_PREFIX) and not count_smp:
            click.echo(f"{name:<27} {'(parameters, tiles: --smp)':<62} {model_summary(name)}")
        else:
            click.echo(_model_row(name, meta_model(name, {}), model_summary(name)))


def _model_row(name: str, model: Any, summary: str) -> str:
    """One line of `segkit models`: name, parameters, tiles and what the model is."""
    g = model.geometry
    params = sum(p.numel() for p in model.parameters())
    if g.margin:
        shape = f"tiles {g.min_input} + {g.step}k, margin {g.margin} (572 -> {g.output_size(572)})"
    else:
        shape = f"tiles {g.min_input} + {g.step}k, same size out, halo {g.halo}"
    return f"{name:<27} {params / 1e6:7.2f} M params  {shape:<44} {summary}"


# -- demo ----------------------------------------------------------------------------------

@main.command()
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), default=Path("segkit-demo"), show_default=True,
              help="Folder for the prediction TIFF, overlay PNG and scores JSON.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace earlier demo outputs.")
def demo(output_dir: Path, device: str, overwrite: bool) -> None:
    """Run the bundled model on the bundled ISBI 2012 crop, score it, write TIFF + PNG overlay.

    The crop is ISBI 2012 slices 25-29 (held out from the bundled model's training). Prints pixel
    error, adapted Rand error and VI of the membranes and of the watershed neuron instances, and
    writes prediction.tif, instances.tif, overlay.png and scores.json.

    
    Example:
      segkit demo -o segkit-demo
    """
    from segkit.demo import run_demo

    result = run_demo(output_dir, device=device, overwrite=overwrite, echo=_cli_echo())
    click.echo(format_scores(result["scores"], "scores on the bundled crop (ISBI 2012 held-out slices 25-29) at "
                                               f"membrane threshold {result['threshold']:g} (the bundled model's)"))
    watershed = ", ".join(f"{key.replace('_', ' ')} {value:g}" for key, value in result["watershed"].items())
    click.echo(format_scores(result["instance_scores"], f"neuron instances (seeded watershed, `segkit segment`: "
                                                        f"{watershed})"))
    for key in ("prediction", "instances", "overlay", "scores_json"):
        click.echo(f"wrote {result[key]}")


# -- package (bioimage.io) -----------------------------------------------------------------

@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Package to write, a .zip (default: the checkpoint's name with .bioimageio.zip; for demo, "
                   "./demo.bioimageio.zip).")
@click.option("--author", multiple=True, help="An author's name (required; repeat for several authors).")
@click.option("--maintainer", multiple=True, metavar="GITHUB_USER",
              help="GitHub user name of someone who answers for the package (bioimage.io maintainers; repeat for "
                   "several). Without one, bioimageio.spec warns that the package has no maintainers.")
@click.option("--name", default=None, show_default="from the model", help="The model's name on bioimage.io.")
@click.option("--description", default=None, show_default="from the model", help="One-sentence description.")
@click.option("--license", default="MIT", show_default=True, help="SPDX license id of the weights.")
@click.option("--with-denoiser", "denoiser_path", type=click.Path(path_type=Path), default=None,
              help="Denoiser checkpoint to put in front of the segmenter, in the same package.")
@click.option("--tile", type=int, default=None, show_default="from the checkpoint's tile, at least 256",
              help="Size of the test tile, a valid input size of the package (the model's valid output sizes: "
                   "the package mirrors its input by the model's margin).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (13-20).")
@click.option("--no-test", is_flag=True, help="Skip bioimageio.core's model test (the spec is still validated).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def package(checkpoint: Path, output: Path | None, author: tuple[str, ...], maintainer: tuple[str, ...],
            name: str | None, description: str | None, license: str, denoiser_path: Path | None, tile: int | None,
            opset: int, no_test: bool, overwrite: bool) -> None:
    """Write a bioimage.io model package (spec 0.5) of a CHECKPOINT (or demo: the bundled U-Net) for
    Fiji/deepImageJ, ilastik, napari, QuPath and BiaPy. Needs: pip install 'segkit-bio[bioimageio]'.

    The package holds the weights as PyTorch state dict (with the architecture as arch.py inside,
    which needs torch only, not segkit), TorchScript and ONNX (each checked against torch); smp models
    get TorchScript and ONNX only (their architecture needs segmentation-models-pytorch). Input sizes
    and halo come from the model's geometry (valid-conv models mirror their input by their margin, so
    bioimageio.core tiles them), preprocessing from the checkpoint's normalisation (fixed mean/std, or
    scale_range for percentile models), outputs are one class's probability (membrane models), every
    class's (K-class models) or the denoised image; test tensors from the bundled ISBI 2012 crop, a
    cover, a README, license, authors, maintainers and citations. It is validated with
    bioimageio.spec and tested with bioimageio.core (on the CPU, offline) before it is written.

    \b
    Examples:
      segkit package runs/em_neurons/best.safetensors -o unet_em.zip --author "Jane Doe" --maintainer janedoe
      segkit package seg.safetensors --with-denoiser den.safetensors -o denoised_unet.zip --author "Jane Doe"
      segkit package demo --author "Jane Doe"             # the bundled U-Net -> demo.bioimageio.zip
    """
    from segkit.bioimageio.write import package_checkpoint

    checkpoint, output = _bundled_or_path(checkpoint, output, ".bioimageio.zip")
    record = package_checkpoint(checkpoint, output, author=author, maintainer=maintainer, denoiser=denoiser_path,
                                name=name, description=description, license=license, tile=tile, opset=opset,
                                test=not no_test, overwrite=overwrite, report=_cli_echo(err=True))
    size = record.path.stat().st_size / 1e6
    sizes = f"{record.input_sizes[0]} + {record.input_sizes[1]}n px"
    halo = f", halo {record.halo} px" if record.halo else ""
    pad = f" (the input mirrored by {record.pad[0]}/{record.pad[1]} px inside)" if any(record.pad) else ""
    click.echo(f"wrote {record.path} ({size:.1f} MB; weights {', '.join(record.weights)}; inputs {sizes}, "
               f"outputs the input's size{halo}{pad}; test tile {record.tile})")
    for note in record.notes:
        click.echo(f"note: {note}")
    click.echo("checks: " + "; ".join(record.checks))


# -- info ----------------------------------------------------------------------------------

@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
def info(as_json: bool) -> None:
    """Versions, torch's devices and ONNX Runtime's providers: what segkit will run on.

    \b
    Example (paste its output into a bug report):
      segkit info
    """
    from segkit.info import describe, format_info

    details = describe()
    click.echo(json.dumps(details) if as_json else format_info(details))


# -- data ----------------------------------------------------------------------------------

@main.group()
def data() -> None:
    """The public data sets the recipes, tests and benchmarks read: ISBI 2012 (isbi2012/), BBBC039 (bbbc039/)
    and AxonDeepSeg SEM (axondeepseg_sem/), one folder each under $SEGKIT_DATA.

    segkit downloads nothing: `segkit data check` says what is there and where to get the rest.

    \b
    Example:
      segkit data check
    """


@data.command("check")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--root", type=click.Path(path_type=Path), default=None,
              show_default="$SEGKIT_DATA, else ../shared/data beside the segkit checkout",
              help="The folder holding the data sets' folders.")
@click.option("--quick", is_flag=True,
              help="Read only the images' headers (shape, dtype, pixel size) and the text files' sizes; no pixel "
                   "decoding (decoding all three sets reads 343 MB of pixels).")
def data_check(names: tuple[str, ...], root: Path | None, quick: bool) -> None:
    """Compare the data sets' folders with segkit's catalogue: which files are present, missing, or differ
    from the reference copy (an image's shape, dtype, pixel size or decoded pixels, whatever its TIFF
    compression; a split list's size or sha256), and for an incomplete set where to get it, its licence
    and layout. NAME: isbi2012, bbbc039 or axondeepseg_sem (default: all).

    Exit code 0: every set asked for is complete; 1: a file is missing or differs; 2: an unknown NAME.
    A progress bar (stderr, on a terminal) shows the decoding and hashing.

    \b
    Examples:
      segkit data check                        # every set, in $SEGKIT_DATA
      segkit data check bbbc039 --root /data   # /data/bbbc039 only
      segkit data check --quick                # headers and sizes only, no decoding
    """
    from tqdm import tqdm

    from segkit.data_check import bytes_to_hash, check_dataset, format_report, load_catalog, resolve_root, select

    datasets = select(load_catalog(), names)
    folder, source = resolve_root(root)
    click.echo(f"data root: {folder} ({source})")
    total = 0 if quick else sum(bytes_to_hash(d, folder / d.name) for d in datasets)
    with tqdm(total=total, unit="B", unit_scale=True, desc="checking", file=sys.stderr, leave=False,
              disable=None if total else True) as bar:
        reports = [check_dataset(d, folder / d.name, quick=quick, progress=bar.update) for d in datasets]
    for report in reports:
        click.echo(format_report(report))
    incomplete = [report.dataset.name for report in reports if not report.complete]
    if incomplete:
        click.echo(f"incomplete: {', '.join(incomplete)} (exit code 1); segkit downloads nothing: get the files "
                   "from the sources above, then run this again")
        raise SystemExit(1)
    click.echo(f"complete: {', '.join(report.dataset.name for report in reports)}")


if __name__ == "__main__":  # pragma: no cover
    main()
