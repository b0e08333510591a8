import tracemalloc

import numpy as np
import pytest
import tifffile

from segkit.checkpoint import Normalization
from segkit.inference.pipeline import OutputSpec, predict_stack, stack_normalization
from segkit.io.tiff import open_stack
from segkit.models.geometry import Geometry

GEOMETRY = Geometry(margin=3, step=4, min_output=4)


def centre_forward(batch):  # a "valid" model: sigmoid of the centre of its input
    return 1 / (1 + np.exp(-batch[:, :, 3:-3, 3:-3]))


def make_stack(path, planes, size=256):
    rng = np.random.default_rng(0)
    with tifffile.TiffWriter(path) as writer:
        for _ in range(planes):
            writer.write(rng.integers(0, 255, (size, size), dtype=np.uint8), photometric="minisblack",
                         contiguous=True)
    return path


def peak_bytes(tmp_path, planes):
    source = make_stack(tmp_path / f"in{planes}.tif", planes)
    with open_stack(source) as stack:
        tracemalloc.start()
        predict_stack(stack, centre_forward, GEOMETRY, tmp_path / f"out{planes}.tif",
                      normalization=Normalization(0.0, 255.0), tile=70, batch=8)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_memory_does_not_grow_with_planes(tmp_path):
    small, large = peak_bytes(tmp_path, 4), peak_bytes(tmp_path, 32)
    plane_bytes = 256 * 256 * 4
    print(f"peak traced memory: 4 planes {small / 1e6:.1f} MB, 32 planes {large / 1e6:.1f} MB")
    assert large < small + 4 * plane_bytes  # 28 more planes would cost >= 7 MB if they were kept


def test_pipeline_values(tmp_path):
    source = make_stack(tmp_path / "in.tif", 3, size=50)
    with open_stack(source) as stack:
        predict_stack(stack, centre_forward, GEOMETRY, tmp_path / "o.tif", normalization=Normalization(100.0, 50.0),
                      tile=30, spec=OutputSpec("float16"))
    expected = 1 / (1 + np.exp(-(tifffile.imread(source).astype(np.float32) - 100) / 50))
    np.testing.assert_allclose(tifffile.imread(tmp_path / "o.tif").astype(np.float32), expected, atol=1e-3)


def test_stack_normalization_is_global(tmp_path):
    data = np.stack([np.full((40, 40), v, np.uint16) for v in (100, 200, 300)])
    tifffile.imwrite(tmp_path / "s.tif", data, photometric="minisblack")
    with open_stack(tmp_path / "s.tif") as stack:
        norm = stack_normalization(stack)
    assert norm.mean == pytest.approx(200) and norm.std == pytest.approx(np.std([100, 200, 300]))


def test_output_spec():
    p = np.array([0.0, 0.49, 0.5, 1.0], np.float32)
    np.testing.assert_array_equal(OutputSpec("uint8").encode(p), [0, 125, 128, 255])
    np.testing.assert_array_equal(OutputSpec("mask", 0.5).encode(p), [0, 0, 255, 255])


def test_writer_runs_behind_and_keeps_order():
    import threading

    from segkit.inference.pipeline import consume_behind

    threads = set()

    def consume(stream):
        out = []
        for item in stream:
            threads.add(threading.current_thread().name)
            out.append(item)
        return out

    assert consume_behind(consume, iter(range(50)), depth=3) == list(range(50))
    assert threads == {"segkit-writer"}


def test_errors_on_either_side_stop_both_and_leave_no_output(tmp_path):
    from segkit.inference.pipeline import consume_behind

    def produce():
        yield 1
        yield 2
        raise RuntimeError("engine failed")

    seen = []

    def consume(stream):
        try:
            for item in stream:
                seen.append(item)
        except RuntimeError:
            seen.append("cleanup")
            raise

    with pytest.raises(RuntimeError, match="engine failed"):
        consume_behind(consume, produce())
    assert seen == [1, 2, "cleanup"]  # the consumer saw the failure and could clean up

    produced = []

    def endless():
        for i in range(10_000):
            produced.append(i)
            yield i

    def failing(stream):
        next(stream)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        consume_behind(failing, endless(), depth=2)
    assert len(produced) < 10  # the producer stopped soon after the writer failed

    # through predict_stack: an engine that fails on the third batch leaves neither output nor temp file
    source = make_stack(tmp_path / "in.tif", 4, size=50)
    calls = []

    def flaky(batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access")
        return centre_forward(batch)

    with open_stack(source) as stack, pytest.raises(RuntimeError, match="illegal memory access"):
        predict_stack(stack, flaky, GEOMETRY, tmp_path / "out.tif", normalization=Normalization(0.0, 255.0),
                      tile=30, batch=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]
