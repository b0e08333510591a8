"""segkit.io.pyramid: halving a level (mean for probabilities, nearest for labels), chunk by chunk."""

import numpy as np
import pytest

from segkit.io.pyramid import halve, level_regions, write_level_region


def test_mean_of_2x2_blocks_rounded_back_to_the_dtype():
    block = np.array([[0, 1, 10], [2, 2, 20], [255, 255, 7]], np.uint8)
    # (0+1+2+2)/4 = 1.25 -> 1; (10+20)/2 = 15 (an odd column: the pixels it has); 255; 7
    np.testing.assert_array_equal(halve(block, "mean"), np.array([[1, 15], [255, 7]], np.uint8))
    assert halve(np.full((2, 2), 0.3, np.float16), "mean").dtype == np.float16
    assert halve(np.array([[1, 2], [2, 2]], np.uint16), "mean")[0, 0] == 2  # 1.75 rounds to nearest
    channels = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
    halved = halve(channels, "mean")
    assert halved.shape == (2, 2, 3) and halved[1, 0, 0] == np.mean(channels[1, :2, :2])


def test_nearest_keeps_the_labels():
    ids = np.arange(1, 26, dtype=np.uint32).reshape(5, 5)
    np.testing.assert_array_equal(halve(ids, "nearest"), ids[::2, ::2])
    assert set(np.unique(halve(ids, "nearest"))) <= set(np.unique(ids))
    with pytest.raises(ValueError, match="expected one of mean, nearest"):
        halve(ids, "max")


def test_level_regions_cover_the_plane():
    regions = list(level_regions(33, 28, 16, 16))
    assert regions == [(0, 16, 0, 16), (0, 16, 16, 28), (16, 32, 0, 16), (16, 32, 16, 28), (32, 33, 0, 16),
                       (32, 33, 16, 28)]


def test_write_level_region_from_the_level_before(tmp_path):
    zarr = pytest.importorskip("zarr")

    group = zarr.open_group(str(tmp_path / "image.zarr"), mode="w", zarr_format=2)
    data = np.random.default_rng(0).integers(0, 256, (2, 2, 9, 7), dtype=np.uint8)
    group.create_array("0", shape=data.shape, chunks=(1, 1, 4, 4), dtype=np.uint8)[:] = data
    group.create_array("1", shape=(2, 2, 5, 4), chunks=(1, 1, 4, 4), dtype=np.uint8, fill_value=0)
    for z in range(2):
        for region in level_regions(5, 4, 4, 4):
            write_level_region(tmp_path / "image.zarr", 1, z, region, "mean")
    np.testing.assert_array_equal(group["1"][:], halve(data, "mean"))
