"""Denoiser pre-stage on ISBI 2012 held-out slices 25-29: image quality and segmentation.

Usage:
  python tools/bench_denoise.py --denoiser runs/denoise_em/best.safetensors \\
      [--segmenter segkit/data/unet_isbi_demo.safetensors] [--root ../shared/data/isbi2012] [--panel docs/denoise_panel.png]

The test slices are corrupted with the noise the denoiser was trained on (fixed seed). Reports
PSNR/SSIM against the clean slices for: the noisy input, a median filter and a Gaussian filter
(each with its size chosen on the validation slices 20-24), and the denoiser; then the
segmenter's pixel error and adapted Rand error on clean, noisy, and denoised input (the
pre-stage), at the segmenter's validated threshold. Prints one JSON line; writes a panel
(noisy | denoised | clean) when --panel is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tifffile

MEDIAN_SIZES = (3, 5, 7)
GAUSSIAN_SIGMAS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
NOISE_SEED = 2012


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--denoiser", type=Path, required=True)
    parser.add_argument("--segmenter", type=Path, default=Path("segkit/data/unet_isbi_demo.safetensors"))
    parser.add_argument("--root", type=Path, default=Path("../shared/data/isbi2012"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--panel", type=Path, help="write a noisy | denoised | clean panel here (.png or .jpg)")
    args = parser.parse_args()

    from scipy import ndimage

    from segkit.checkpoint import load_model
    from segkit.devices import resolve_device
    from segkit.inference.engines import TorchEngine
    from segkit.inference.tiler import predict_arrays
    from segkit.metrics import mean_scores, score_slice
    from segkit.training.corruption import corrupt, psnr, ssim
    from segkit.training.denoise_loop import denoise_planes

    device = resolve_device(args.device)
    denoiser, den_info = load_model(args.denoiser, expect_kind="denoiser")
    corruption = den_info.training.get("corruption") or den_info.recipe["corruption"]
    raw = tifffile.imread(args.root / "train-volume.tif").astype(np.float32) / 255.0
    labels = tifffile.imread(args.root / "train-labels.tif")
    rng = np.random.default_rng(NOISE_SEED)
    noisy_all = {z: corrupt(raw[z], rng, corruption) for z in range(20, 30)}
    val, test = range(20, 25), range(25, 30)

    def quality(planes: dict[int, np.ndarray], zs: range) -> dict[str, float]:
        return {"psnr": float(np.mean([psnr(planes[z], raw[z]) for z in zs])),
                "ssim": float(np.mean([ssim(planes[z], raw[z]) for z in zs]))}

    median = min(MEDIAN_SIZES, key=lambda k: -quality({z: ndimage.median_filter(noisy_all[z], k) for z in val}, val)["psnr"])
    sigma = min(GAUSSIAN_SIGMAS, key=lambda s: -quality({z: ndimage.gaussian_filter(noisy_all[z], s) for z in val}, val)["psnr"])
    outputs = {
        "noisy": {z: noisy_all[z] for z in test},
        f"median {median}x{median}": {z: ndimage.median_filter(noisy_all[z], median) for z in test},
        f"gaussian sigma {sigma}": {z: ndimage.gaussian_filter(noisy_all[z], sigma) for z in test},
    }
    scale = float(den_info.inference.intensity_scale or 255.0)
    denoised = denoise_planes(denoiser, [noisy_all[z] for z in test], normalization=den_info.normalization,
                              scale=scale, tile=int(den_info.inference.tile), batch=8, device=device)
    outputs["denoiser"] = dict(zip(test, denoised))
    image_quality = {name: quality(planes, test) for name, planes in outputs.items()}

    segmenter, seg_info = load_model(args.segmenter)
    engine = TorchEngine(segmenter, device=device, amp="none")
    threshold = float(seg_info.inference.threshold if seg_info.inference.threshold is not None else 0.5)
    from segkit.inference.loading import trained_tile

    tile = trained_tile(seg_info, segmenter.geometry)  # the one place the default tile is decided
    norm = seg_info.normalization

    def segmentation(planes: list[np.ndarray]) -> dict[str, float]:
        normalized = [norm.apply(p * 255.0) for p in planes]
        probabilities = predict_arrays(normalized, engine, segmenter.geometry, tile=tile, batch=8)
        scores = [score_slice(p[0], labels[z] == 0, threshold=threshold) for p, z in zip(probabilities, test)]
        summary = mean_scores(scores)
        return {k: summary[k] for k in ("pixel_error", "adapted_rand_error", "vi")}

    segmentation_scores = {
        "clean": segmentation([raw[z] for z in test]),
        "noisy": segmentation([outputs["noisy"][z] for z in test]),
        "denoiser pre-stage": segmentation([outputs["denoiser"][z] for z in test]),
    }
    if args.panel:
        import cv2

        crop = (slice(128, 384), slice(128, 384))
        tiles = [np.clip(p[crop], 0, 1) for p in (outputs["noisy"][25], outputs["denoiser"][25], raw[25])]
        gap = np.ones((256, 6), np.float32)
        panel = np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)
        cv2.imwrite(str(args.panel), (panel * 255).astype(np.uint8))
    print(json.dumps({
        "device": device, "denoiser": str(args.denoiser), "segmenter": str(args.segmenter),
        "corruption": corruption, "test_slices": [25, 30], "baseline_sizes_chosen_on": [20, 25],
        "image_quality": image_quality, "segmentation": segmentation_scores,
    }))


if __name__ == "__main__":
    main()
