"""`segkit demo`: the bundled U-Net on a bundled real EM sample, end to end, offline.

The sample is ISBI 2012 slices 25-29 (the project's held-out test split; the bundled model
never saw them), 5 x 512 x 512, with their membrane labels.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segkit.checkpoint import read_info
from segkit.errors import OutputExistsError
from segkit.evaluation import evaluate_instances, evaluate_stacks
from segkit.inference.api import predict
from segkit.inference.loading import BUNDLED_MODEL, default_model_path
from segkit.inference.segment import segment_stack
from segkit.instances import WatershedParams
from segkit.io.outputs import atomic_path, check_folder
from segkit.io.tiff import open_stack

DATA = Path(__file__).parent / "data"
SAMPLE_RAW = DATA / "isbi_test_raw.tif"
SAMPLE_LABELS = DATA / "isbi_test_labels.tif"
DEMO_MODEL = default_model_path()


def overlay_panel(raw: np.ndarray, probability: np.ndarray, membrane: np.ndarray, *, threshold: float) -> np.ndarray:
    """BGR panel: raw | membrane probability | raw with predicted (red) and true (green) membranes."""
    gray = raw.astype(np.float32)
    gray = (255 * (gray - gray.min()) / max(float(np.ptp(gray)), 1e-6)).astype(np.uint8)
    prob = (np.clip(probability, 0, 1) * 255).astype(np.uint8)
    overlay = np.stack([gray, gray, gray], axis=-1).astype(np.float32)
    predicted = probability >= threshold
    overlay[predicted] = 0.5 * overlay[predicted] + 0.5 * np.array([0, 0, 255])
    overlay[membrane & ~predicted] = 0.5 * overlay[membrane & ~predicted] + 0.5 * np.array([0, 255, 0])
    gap = np.full((gray.shape[0], 8, 3), 255, np.uint8)
    as_bgr = lambda image: np.stack([image] * 3, axis=-1)  # noqa: E731
    return np.concatenate([as_bgr(gray), gap, as_bgr(prob), gap, overlay.astype(np.uint8)], axis=1)


def run_demo(output_dir: Path, *, device: str = "auto", overwrite: bool = False,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Predict the sample, score it against its labels, write TIFF, PNG overlay and JSON."""
    import cv2

    output_dir = Path(output_dir)
    prediction = output_dir / "prediction.tif"
    instances = output_dir / "instances.tif"
    overlay = output_dir / "overlay.png"
    scores_json = output_dir / "scores.json"
    existing = [p for p in (prediction, instances, overlay, scores_json) if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]} already exists; pass overwrite=True or choose another output_dir=DIR")
    check_folder(output_dir, create=True)  # a folder (or one that can be made) that can be written, before any work
    output_dir.mkdir(parents=True, exist_ok=True)

    info = read_info(DEMO_MODEL)
    threshold = float(info.inference.threshold if info.inference.threshold is not None else 0.5)
    echo(f"predicting {SAMPLE_RAW.name} (ISBI 2012 slices 25-29) with the bundled U-Net ({BUNDLED_MODEL})")
    predict(SAMPLE_RAW, prediction, model=DEMO_MODEL, device=device, batch=4, overwrite=True, report=echo)
    echo(f"membrane threshold {threshold} (the bundled model's, chosen on validation slices 20-24; `segkit "
         f"evaluate {prediction} {SAMPLE_LABELS} -m {BUNDLED_MODEL}` scores at it too)")
    report = evaluate_stacks(str(prediction), str(SAMPLE_LABELS), threshold=threshold)
    # neuron instances with the watershed settings chosen on validation slices 20-24
    params = WatershedParams.from_dict(info.inference.watershed or {})
    segment_stack(str(prediction), instances, params, overwrite=True)
    report["instances"] = {"watershed": params.to_dict(),
                           "scores": evaluate_instances(str(instances), str(SAMPLE_LABELS))["scores"]}
    with open_stack(SAMPLE_RAW) as raw, open_stack(prediction) as pred, open_stack(SAMPLE_LABELS) as labels:
        middle = len(raw) // 2
        panel = overlay_panel(raw.plane(middle), pred.plane(middle) / 255.0, labels.plane(middle) == 0,
                              threshold=threshold)
    with atomic_path(overlay) as tmp:
        if not cv2.imwrite(str(tmp.with_suffix(".png")), panel):
            raise OSError(f"could not write {overlay}")
        tmp.with_suffix(".png").replace(tmp)
    with atomic_path(scores_json) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    return {"scores": report["scores"], "instance_scores": report["instances"]["scores"], "prediction": prediction,
            "instances": instances, "overlay": overlay, "scores_json": scores_json, "threshold": threshold,
            "watershed": params.to_dict()}
