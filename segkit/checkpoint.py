"""Checkpoint files: safetensors weights plus the JSON record (`segkit.record`) in the file's header.

This module reads and writes the files only: the record's schema and checks are `segkit.record`'s,
the normalisation `segkit.normalization`'s, the memory check `segkit.memory`'s, and a denoiser in
front of a segmenter `segkit.models.compose`'s. The record holds the model name and kwargs,
geometry, normalisation, the resolved recipe and the segkit version, so `segkit predict` needs
only the checkpoint. Nothing is pickled. Files are written under a temporary name and renamed
(`segkit.io.outputs.atomic_path`). safetensors' torch functions are imported by the functions
that read or write weights, so reading a record (`read_info`) imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from segkit.errors import CheckpointError, SegkitError
from segkit.io.outputs import atomic_path
from segkit.memory import check_weights_fit
from segkit.models import create_model
from segkit.record import CheckpointInfo, InferenceDefaults, check_record


def save_checkpoint(path: str | Path, model: Any, info: CheckpointInfo) -> None:
    """Write a model's weights and its record as one safetensors file.

    The file is written under a temporary name and renamed (`segkit.io.outputs.atomic_path`), so an
    interrupted write leaves no half-written checkpoint.

    Parameters
    ----------
    path : str or Path
        The checkpoint to write (.safetensors); its folder is created if needed.
    model : torch.nn.Module
        The model; its state dict is copied to the CPU.
    info : CheckpointInfo
        Its record, stored as JSON in the file's metadata.

    Raises
    ------
    OutputError
        The file could not be written (disk full, no permission).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"segkit": info.to_json()})
        match_umask(tmp)


def match_umask(path: Path) -> None:
    """Give `path` the permissions of a file created under the process's umask.

    safetensors creates files owner-only; checkpoints are shared like any other output file.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_info(path: str | Path) -> CheckpointInfo:
    """Read the record of a checkpoint (fast: no weights, no torch).

    The file is first checked to hold every byte its tensor table points to; the record is then
    validated (`check_record`).

    Parameters
    ----------
    path : str or Path
        A .safetensors checkpoint from `segkit train`.

    Returns
    -------
    CheckpointInfo
        Its record.

    Raises
    ------
    CheckpointError
        The file is missing, not a safetensors file, truncated or damaged, has no segkit record, or
        its record is refused.
    """
    header = _read_header(Path(path))
    try:
        record = header["__metadata__"]["segkit"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a segkit checkpoint (safetensors with a segkit record): "
                              f"it has no segkit record; pass a checkpoint from `segkit train`") from exc
    return CheckpointInfo.from_json(record, str(path))


#: safetensors dtype names and their sizes in bytes.
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file: every tensor's byte range
    lies inside the data, matches its shape and dtype, and the data is exactly covered (a truncated
    or damaged file fails here, with one line, before any weight is read)."""
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist; check the path (segkit reads .safetensors "
                              "checkpoints from `segkit train`, .onnx files from `segkit export`, and 'demo', the bundled U-Net)")
    not_ours = f"{path} is not a segkit checkpoint (safetensors with a segkit record)"
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_len <= 0 or header_len > 100_000_000 or 8 + header_len > size:
                raise ValueError(f"its header length {header_len} does not fit a file of {size} bytes")
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{not_ours}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{not_ours}: its header is a JSON {type(header).__name__}, not a table of tensors")
    data_size = size - 8 - header_len
    damaged = f"{path} is truncated or damaged"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in entry["data_offsets"])
            count = int(np.prod([int(n) for n in entry["shape"]], dtype=np.int64)) * _DTYPE_SIZES[entry["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{damaged}: the entry of tensor {name!r} is malformed; copy the checkpoint again "
                                  "or use another one") from exc
        if not 0 <= begin <= stop or stop - begin != count:
            raise CheckpointError(f"{damaged}: tensor {name!r} has byte range {begin}-{stop}, but its shape and dtype "
                                  f"need {count} bytes; copy the checkpoint again or use another one")
        if stop > data_size:
            raise CheckpointError(f"{damaged}: tensor {name!r} ends at byte {stop} of the weights, but the file holds "
                                  f"{data_size} bytes of weights; copy the checkpoint again or use another one")
        end = max(end, stop)
    if end != data_size:
        raise CheckpointError(f"{damaged}: its tensors cover {end} of its {data_size} bytes of weights; copy the "
                              "checkpoint again or use another one")
    return header


def _stored_values(header: dict[str, Any]) -> int:
    """The number of values the tensors of a safetensors header (`_read_header`) hold."""
    return sum(int(np.prod([int(n) for n in entry["shape"]], dtype=np.int64))
               for name, entry in header.items() if name != "__metadata__")


def load_model(path: str | Path, *, expect_kind: str = "segmenter") -> tuple[Any, CheckpointInfo]:
    """Rebuild the model of a checkpoint and load its weights (strict).

    Before anything is allocated, the record's model is checked against the file's tensors and the
    memory available (`segkit.memory.check_weights_fit`).

    Parameters
    ----------
    path : str or Path
        A .safetensors checkpoint.
    expect_kind : {"segmenter", "denoiser"}
        The kind of model the caller needs.

    Returns
    -------
    model : torch.nn.Module
        The model on the CPU, in eval mode.
    info : CheckpointInfo
        Its record.

    Raises
    ------
    CheckpointError
        The file or its record is refused (see `read_info`), the checkpoint is of another kind, its
        geometry or weights do not match its model, or its parameters do not fit in memory.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = read_info(path)
    if info.kind != expect_kind:
        use = {"denoiser": "use it with `segkit denoise`, or in front of a segmenter with `segkit predict --denoise`",
               "segmenter": "use it with `segkit predict`"}.get(info.kind, "")
        raise CheckpointError(f"{path} is a {info.kind} checkpoint, but a {expect_kind} checkpoint is needed here; {use}")
    meta = check_weights_fit(path, info, _stored_values(_read_header(Path(path))))
    if meta.geometry != info.geometry:
        raise CheckpointError(f"{path}: recorded geometry {info.geometry} differs from the model's {meta.geometry}; "
                              "the checkpoint is damaged or was edited: use another one or train again")
    try:
        model = create_model(info.model, **info.model_kwargs)
    except SegkitError as exc:
        raise CheckpointError(f"{path}: {exc}; the checkpoint is damaged or was edited: use another one or "
                              "train again") from exc
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, OSError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match model '{info.model}': {first}") from exc
    model.eval()
    return model, info


def initialize_from(model: Any, path: str | Path) -> int:
    """Copy every tensor of a segkit checkpoint whose name and shape match into `model`.

    This is how FCN-16s starts from a trained FCN-32s (and 8s from 16s): the shared layers carry
    over, the new skip layers keep their initialisation.

    Parameters
    ----------
    model : torch.nn.Module
        The model to initialise (changed in place).
    path : str or Path
        A segkit checkpoint.

    Returns
    -------
    int
        The number of tensors copied.

    Raises
    ------
    CheckpointError
        The file is not a segkit checkpoint, or none of its tensors fits the model.
    """
    from safetensors.torch import load_file

    read_info(path)  # a clear error for a missing or foreign file
    source = load_file(str(path))
    ours = model.state_dict()
    matching = {k: v for k, v in source.items() if k in ours and ours[k].shape == v.shape}
    if not matching:
        raise CheckpointError(f"model.init_from: no tensor of {path} matches the model's layers")
    model.load_state_dict(matching, strict=False)
    return len(matching)


def update_inference_defaults(path: str | Path, updates: dict[str, Any], *, chosen_on: tuple[int, int]) -> CheckpointInfo:
    """Write new inference defaults into a checkpoint (atomically: temporary name, then rename).

    Parameters
    ----------
    path : str or Path
        The checkpoint.
    updates : dict
        Field name -> value (see `InferenceDefaults`).
    chosen_on : (int, int)
        The slices (start, stop) the values were chosen on; they must lie within the recipe's
        validation slices, never the test slices.

    Returns
    -------
    CheckpointInfo
        The updated record.

    Raises
    ------
    CheckpointError
        The slices are not the validation slices, a field is unknown, or the updated record is
        refused (`check_record`).
    OutputError
        The file could not be written.
    """
    from safetensors.torch import load_file, save_file

    path = Path(path)
    info = read_info(path)
    val = info.recipe.get("data", {}).get("val_slices")
    if val is not None and not (val[0] <= chosen_on[0] and chosen_on[1] <= val[1]):
        raise CheckpointError(f"{path.name}: inference defaults must be chosen on the validation slices {val[0]}:{val[1]} "
                              f"of its recipe, not {chosen_on[0]}:{chosen_on[1]}; choose them on slices=({val[0]}, {val[1]})")
    known = [f.name for f in dataclasses.fields(InferenceDefaults)]
    unknown = sorted(set(updates) - set(known))
    if unknown:
        raise CheckpointError(f"{path.name}: unknown inference default {unknown[0]!r}; choose from {', '.join(known)}")
    info.inference = info.inference.replace(**updates)
    check_record(info, path.name)
    tensors = load_file(str(path))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"segkit": info.to_json()})
        match_umask(tmp)
    return info
