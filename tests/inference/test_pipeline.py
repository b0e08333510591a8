"""The stack pipeline: TIFF planes onto the engine's device, tiled, encoded there, written behind;
memory stays flat, errors on either side leave no output."""

import copy
import gc
import tracemalloc

import numpy as np
import pytest
import tifffile
import torch

from segkit.inference.encodings import IntensityEncoding, ProbabilityEncoding
from segkit.inference.pipeline import predict_stack, read_ahead
from segkit.io.tiff import open_stack
from segkit.models.geometry import Geometry
from segkit.normalization import Normalization, stack_normalization
from tests.helpers import FakeEngine, crop_engine

GEOMETRY = Geometry(margin=3, step=4, min_output=4)


def centre_engine():
    """A "valid" model: sigmoid of the centre of its input."""
    return crop_engine(3, torch.sigmoid)


def make_stack(path, planes, size=256):
    rng = np.random.default_rng(0)
    with tifffile.TiffWriter(path) as writer:
        for _ in range(planes):
            writer.write(rng.integers(0, 255, (size, size), dtype=np.uint8), photometric="minisblack",
                         contiguous=True)
    return path


def live_tensor_bytes():
    """Bytes held by every torch tensor alive now (each storage counted once); tracemalloc does
    not see torch's allocations."""
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):  # type(): no __class__ look-up on lazy modules
            try:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # fake tensors left by torch.compile elsewhere hold no memory
                continue
    return sum(storages.values())


def peak_bytes(tmp_path, planes, *, tensors):
    """Peak host memory of a run over `planes` planes: numpy/Python allocations (tracemalloc), or
    torch tensors alive whenever the engine runs (`tensors`), measured in separate runs so one
    measurement does not disturb the other."""
    source = make_stack(tmp_path / f"in{planes}.tif", planes)
    peak = [0]

    def sampling(batch):
        peak[0] = max(peak[0], live_tensor_bytes())
        return torch.sigmoid(batch[:, :, 3:-3, 3:-3])

    engine = FakeEngine(sampling) if tensors else centre_engine()
    output = tmp_path / f"out{planes}_{tensors}.tif"
    with open_stack(source) as stack:
        if not tensors:
            tracemalloc.start()
        predict_stack(stack, engine, GEOMETRY, output, normalization=Normalization(0.0, 255.0), tile=70, batch=8)
        if not tensors:
            peak[0] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert len(tifffile.TiffFile(output).pages) == planes
    return peak[0]


@pytest.mark.parametrize("tensors", [False, True], ids=["host", "tensors"])
def test_memory_does_not_grow_with_planes(tmp_path, tensors):
    small, large = peak_bytes(tmp_path, 4, tensors=tensors), peak_bytes(tmp_path, 32, tensors=tensors)
    plane_bytes = 256 * 256 * 4
    what = "live tensors" if tensors else "traced host memory"
    print(f"peak {what}: 4 planes {small / 1e6:.2f} MB, 32 planes {large / 1e6:.2f} MB")
    assert small > plane_bytes  # the measurement sees the planes in flight
    assert large < small + 4 * plane_bytes  # 28 more planes would cost >= 1.8 MB (uint8) if they were kept


def test_pipeline_values(tmp_path):
    source = make_stack(tmp_path / "in.tif", 3, size=50)
    with open_stack(source) as stack:
        predict_stack(stack, centre_engine(), GEOMETRY, tmp_path / "o.tif", normalization=Normalization(100.0, 50.0),
                      tile=30, spec=ProbabilityEncoding("float16"))
    expected = 1 / (1 + np.exp(-(tifffile.imread(source).astype(np.float32) - 100) / 50))
    written = tifffile.imread(tmp_path / "o.tif")
    assert written.dtype == np.float32 and written.shape == (3, 50, 50)  # float16 values, stored as float32
    np.testing.assert_array_equal(written, written.astype(np.float16))
    np.testing.assert_allclose(written.astype(np.float32), expected, atol=1e-3)


@pytest.mark.parametrize("norm", [Normalization(100.0, 50.0), Normalization(30000.0, 20000.0)])
def test_uint16_input_gives_the_values_of_float32_input(tmp_path, norm):
    """uint16 planes go to the device as they are stored and are normalised there: the same values
    as the same planes stored as float32 (including values above 32767, which int16 would wrap)."""
    rng = np.random.default_rng(7)
    data = rng.integers(0, 65536, (2, 45, 38)).astype(np.uint16)
    data[0, :3, :3] = [[0, 1, 255], [256, 32767, 32768], [40000, 65534, 65535]]
    outputs = {}
    for dtype in (np.uint16, np.float32):
        source = tmp_path / f"in_{np.dtype(dtype).name}.tif"
        tifffile.imwrite(source, data.astype(dtype), photometric="minisblack")
        for kind, engine, spec in (("identity", crop_engine(3), IntensityEncoding(norm, np.dtype(np.float32))),
                                   ("sigmoid", centre_engine(), ProbabilityEncoding("float16"))):
            out = tmp_path / f"out_{np.dtype(dtype).name}_{kind}.tif"
            with open_stack(source) as stack:
                assert stack.dtype == dtype
                predict_stack(stack, engine, GEOMETRY, out, normalization=norm, tile=30, spec=spec)
            outputs[np.dtype(dtype).name, kind] = tifffile.imread(out)
    for kind in ("identity", "sigmoid"):
        np.testing.assert_array_equal(outputs["uint16", kind], outputs["float32", kind])
    # an identity model and the inverse normalisation give the raw values back
    np.testing.assert_allclose(outputs["uint16", "identity"], data, rtol=1e-6, atol=2e-3)
    expected = 1 / (1 + np.exp(-(data.astype(np.float64) - norm.mean) / norm.std))
    np.testing.assert_allclose(outputs["uint16", "sigmoid"].astype(np.float64), expected, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["uint8", "float16"])
def test_pipeline_on_cuda_equals_the_cpu(tmp_path, tiny_unet, kind, monkeypatch):
    """Pinned uploads of uint16 planes on a side stream, normalising, tiling and encoding on the GPU,
    pinned downloads: the planes the CPU path writes (up to cuDNN's rounding)."""
    from segkit.inference.engines import TorchEngine

    rng = np.random.default_rng(9)
    data = rng.integers(0, 65536, (3, 150, 133)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", data, photometric="minisblack")
    norm = Normalization(30000.0, 15000.0)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare float32 with float32
    written = {}
    for device in ("cpu", "cuda"):
        engine = TorchEngine(copy.deepcopy(tiny_unet), device=device, amp="none")  # .to() moves in place
        with open_stack(tmp_path / "in.tif") as stack:
            predict_stack(stack, engine, tiny_unet.geometry, tmp_path / f"{device}.tif", normalization=norm,
                          tile=220, batch=3, spec=ProbabilityEncoding(kind))
        written[device] = tifffile.imread(tmp_path / f"{device}.tif").astype(np.float32)
    assert written["cuda"].shape == data.shape
    scale = 255 if kind == "uint8" else 1
    diff = np.abs(written["cuda"] - written["cpu"]) / scale
    print(f"{kind}: cuda vs cpu max |diff| {diff.max():.3g}, mean {diff.mean():.3g}")
    assert diff.max() <= 1.5 / 255 and diff.mean() < 1e-3


def test_stack_normalization_is_global(tmp_path):
    data = np.stack([np.full((40, 40), v, np.uint16) for v in (100, 200, 300)])
    tifffile.imwrite(tmp_path / "s.tif", data, photometric="minisblack")
    with open_stack(tmp_path / "s.tif") as stack:
        norm = stack_normalization(stack)
    assert norm.mean == pytest.approx(200) and norm.std == pytest.approx(np.std([100, 200, 300]))


def test_output_spec_encodes_tensors_on_the_device():
    p = torch.tensor([[0.0, 0.49, 0.5, 1.0]])  # (K=1, ...) values of one plane
    uint8 = ProbabilityEncoding("uint8").encode(p.clone())
    assert isinstance(uint8, torch.Tensor) and uint8.dtype == torch.uint8 and uint8.device == p.device
    assert uint8.tolist() == [0, 125, 128, 255]
    assert ProbabilityEncoding("mask", 0.5).encode(p).tolist() == [0, 0, 255, 255]
    # against numpy: rint(clip(p) * 255), a mask at the threshold, float16; values outside [0, 1]
    # (a blended or TTA-averaged output may overshoot by rounding) are clipped
    rng = np.random.default_rng(8)
    values = np.concatenate([rng.uniform(-0.2, 1.2, (2, 30, 40)),
                             np.resize(np.arange(256) / 255, (2, 30, 40))]).astype(np.float32)
    tensor = torch.from_numpy(values.copy())
    for channel in (0, 3):
        spec = ProbabilityEncoding("uint8", channel=channel)
        assert spec.dtype == np.uint8
        expected = np.rint(np.clip(values[channel], 0, 1) * 255).astype(np.uint8)
        np.testing.assert_array_equal(spec.encode(tensor.clone()).numpy(), expected)
        mask = ProbabilityEncoding("mask", 0.3, channel=channel)
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask.encode(tensor).numpy(), np.where(values[channel] >= 0.3, 255, 0))
        half = ProbabilityEncoding("float16", channel=channel)
        assert half.dtype == np.float16 and half.encode(tensor).dtype == torch.float16
        np.testing.assert_array_equal(half.encode(tensor).numpy(), values[channel].astype(np.float16))
    assert torch.equal(tensor, torch.from_numpy(values))  # masks and float16 leave the values alone
    spec.encode(tensor)  # uint8 encodes in place (the tiler's accumulator): one float32 plane less per plane
    assert not torch.equal(tensor[3], torch.from_numpy(values[3])) and torch.equal(tensor[0], torch.from_numpy(values[0]))
    assert ProbabilityEncoding().finish(expected) is expected  # nothing left to do on the host


def test_read_ahead_keeps_order_reraises_and_stops_early():
    import threading

    assert list(read_ahead(iter(range(20)), depth=2)) == list(range(20))

    def failing():
        yield 1
        raise OSError("unreadable plane")

    seen = []
    with pytest.raises(OSError, match="unreadable plane"):
        for item in read_ahead(failing()):
            seen.append(item)
    assert seen == [1]
    produced = []

    def endless():
        for i in range(10_000):
            produced.append(i)
            yield i

    before = set(threading.enumerate())
    items = read_ahead(endless(), depth=2, name="read-ahead-test")
    assert next(items) == 0
    (reader,) = [t for t in threading.enumerate() if t not in before]
    assert reader.name == "read-ahead-test" and reader.daemon
    items.close()  # leaving early stops the reader
    assert len(produced) < 10 and not reader.is_alive()


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
    import threading

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
        return torch.sigmoid(batch[:, :, 3:-3, 3:-3])

    before = set(threading.enumerate())
    with open_stack(source) as stack, pytest.raises(RuntimeError, match="illegal memory access"):
        predict_stack(stack, FakeEngine(flaky), GEOMETRY, tmp_path / "out.tif", normalization=Normalization(0.0, 255.0),
                      tile=30, batch=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]
    # the reader thread stopped too, and let go of the planes it read ahead (on a GPU: device and
    # pinned buffers), without waiting for a garbage collection
    started = [t for t in threading.enumerate() if t not in before]
    for thread in started:
        thread.join(timeout=2.0)
    assert not [t.name for t in started if t.is_alive()]


def test_cpu_pipeline_gives_the_engine_every_thread_and_restores_the_count(tmp_path):
    """On the CPU the pipeline's own tensor work runs on one thread (the other cores compress), the
    engine's forward on all of torch's threads; the thread count is restored afterwards, also after a failure."""
    path = tmp_path / "in.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (3, 70, 90), dtype=np.uint8), photometric="minisblack")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def forward(x):
            seen.append(torch.get_num_threads())
            return x[:, :, 3:-3, 3:-3].clone()

        encoding_threads = []

        class RecordingSpec:  # the output-spec interface; encode runs in the pipeline's own thread
            dtype = np.dtype(np.uint8)

            def encode(self, values):
                encoding_threads.append(torch.get_num_threads())
                return ProbabilityEncoding().encode(values)

            def finish(self, plane):
                return plane

        engine = FakeEngine(forward)
        with open_stack(path) as stack:
            predict_stack(stack, engine, GEOMETRY, tmp_path / "out.tif", normalization=Normalization(0.0, 255.0),
                          tile=GEOMETRY.min_input + 16, batch=2, spec=RecordingSpec())
        assert seen and set(seen) == {2}
        assert encoding_threads and set(encoding_threads) == {1}
        assert torch.get_num_threads() == 2

        def failing(x):
            raise RuntimeError("engine failed")

        with open_stack(path) as stack, pytest.raises(RuntimeError, match="engine failed"):
            predict_stack(stack, FakeEngine(failing), GEOMETRY, tmp_path / "out2.tif",
                          normalization=Normalization(0.0, 255.0), tile=GEOMETRY.min_input + 16, batch=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_queues_hold_the_planes_one_batch_spans():
    """A batch of 64 tiles of 16 per plane finishes 4 planes at once: the reader and writer queues
    hold them plus two, so the next batch starts before the writer has caught up."""
    from segkit.inference.pipeline import _planes_in_flight

    assert _planes_in_flight(64, 16) == 6
    assert _planes_in_flight(4, 16) == 3
    assert _planes_in_flight(17, 16) == 4
