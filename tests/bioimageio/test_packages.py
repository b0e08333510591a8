"""bioimage.io model packages: `segkit package` builds them offline from tiny models (a U-Net, an FCN,
an smp model, a denoiser), bioimageio.spec validates them and bioimageio.core's model test runs them
on the CPU; segkit.bioimageio.read runs them (and a package made without segkit) through segkit's
pipeline. Internet connections are refused throughout."""

import json
import re
import socket
import sys
import zipfile

import numpy as np
import pytest
import torch

pytest.importorskip("bioimageio.spec", reason="needs the bioimageio extra: pip install 'segkit-bio[bioimageio]'")
pytest.importorskip("bioimageio.core", reason="needs the bioimageio extra: pip install 'segkit-bio[bioimageio]'")

from bioimageio.spec import load_description  # noqa: E402
from bioimageio.spec.model import v0_5  # noqa: E402

from segkit.bioimageio.write import PackageError, build_package, sample_tile, validate_package  # noqa: E402
from segkit.checkpoint import load_model, read_info  # noqa: E402
from segkit.models import create_model, model_kind  # noqa: E402
from segkit.normalization import Normalization  # noqa: E402
from segkit.record import CheckpointInfo  # noqa: E402
from tests.helpers import assert_user_error, randomize_zero_layers, run, tiny  # noqa: E402

CITED_DOIS = {"10.1007/978-3-319-24574-4_28", "10.1371/journal.pbio.1000502", "10.3389/fnana.2015.00142"}


@pytest.fixture(scope="module", autouse=True)
def refused_connections():
    """Nothing may download: every attempt to open an internet connection is refused (and recorded)."""
    attempts = []
    connect = socket.socket.connect

    def refuse(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network access refused in tests: {address}")
        return connect(sock, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        yield attempts


@pytest.fixture(autouse=True)
def no_network(refused_connections):
    yield
    assert not refused_connections, f"network access attempted: {refused_connections}"


@pytest.fixture(scope="module")
def unet_package(tmp_path_factory, tiny_checkpoint):
    """`segkit package` of the tiny U-Net checkpoint: (the zip, the CLI result)."""
    out = tmp_path_factory.mktemp("package") / "unet.zip"
    result = run("package", tiny_checkpoint, "-o", out, "--author", "Jane Doe", "--author", "John Roe", "--tile", 200,
                 "--maintainer", "jane-doe", "--maintainer", "@jroe")
    return out, result


def test_the_network_guard_refuses_connections(refused_connections):
    with pytest.raises(OSError, match="refused in tests"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: never routed
    assert refused_connections == [("192.0.2.1", 80)]
    refused_connections.clear()


def no_partials(folder):
    return not [p for p in folder.iterdir() if p.name.endswith(".partial")]


def load(path):
    from segkit.bioimageio.write import _known_maintainers, _package_maintainers

    with _known_maintainers(_package_maintainers(path)):  # offline: no GitHub look-up of the maintainers
        descr = load_description(str(path), perform_io_checks=True)
    assert isinstance(descr, v0_5.ModelDescr), descr.validation_summary.format()
    assert descr.validation_summary.status == "valid-format"
    return descr


def test_cli_package_of_a_unet_is_valid_and_passes_the_core_test(tmp_path, tiny_checkpoint, unet_package):
    out, result = unet_package
    assert result.exit_code == 0, result.output
    assert ("inputs 200 + 16n px, outputs the input's size, halo 92 px (the input mirrored by 96/100 px inside); "
            "test tile 200") in result.stdout
    checks = ": valid; " + "; ".join(f"bioimageio.core test ({w}): passed"
                                                          for w in ("pytorch_state_dict", "torchscript", "onnx"))
    assert checks in result.stdout
    assert no_partials(out.parent)

    descr = load(out)
    warnings = [w.msg for detail in descr.validation_summary.details for w in detail.warnings]
    assert not warnings, warnings  # maintainers, sample tensors, README, cover: all there
    assert [m.github_user for m in descr.maintainers] == ["jane-doe", "jroe"]
    (raw,), (prob,) = descr.inputs, descr.outputs
    assert [str(a.id) for a in raw.axes] == ["batch", "channel", "y", "x"] == [str(a.id) for a in prob.axes]
    assert raw.pad.mode == "reflect"  # segkit mirrors plane borders alike
    for axis in raw.axes[2:]:  # twice the halo plus 16k: core's blocks then start on the U-Net's 16 px grid
        assert (axis.size.min, axis.size.step) == (200, 16)
    for axis in prob.axes[2:]:  # the package mirrors the 92 px margin inside: same size out, a 92 px halo
        assert (str(axis.size.tensor_id), str(axis.size.axis_id), axis.size.offset) == ("raw", str(axis.id), 0)
        assert isinstance(axis, v0_5.WithHalo) and axis.halo == 92
    normalize = [p for p in raw.preprocessing if p.id == "fixed_zero_mean_unit_variance"]
    assert [(p.kwargs.mean, p.kwargs.std) for p in normalize] == [(120.0, 40.0)]
    assert {w for w, entry in descr.weights if entry is not None} == {"onnx", "pytorch_state_dict", "torchscript"}
    assert descr.weights.onnx.opset_version == 17 and descr.weights.torchscript.parent == "pytorch_state_dict"
    architecture = descr.weights.pytorch_state_dict.architecture
    assert str(architecture.source) == "arch.py" and str(architecture.callable) == "packaged_model"
    assert architecture.kwargs == {"model": "unet", "model_kwargs": {"base": 4, "depth": 4}, "output": "probability",
                                   "pad": [96, 100], "margin": 92}
    assert [a.name for a in descr.authors] == ["Jane Doe", "John Roe"] and descr.license == "MIT"
    assert {str(c.doi) for c in descr.cite} == CITED_DOIS
    assert len(descr.covers) == 1 and str(descr.covers[0].source).endswith(".png")
    info = read_info(tiny_checkpoint)
    assert descr.config.model_extra["segkit"]["checkpoint"] == json.loads(info.to_json())

    # the test tensors: a tile of the bundled ISBI crop, and the checkpoint's membrane probability for it
    with zipfile.ZipFile(out) as zf:
        x = np.load(zf.open("test_input.npy"))
        y = np.load(zf.open("test_output.npy"))
        assert "## Validation" in zf.read("README.md").decode()
        arch = zf.read("arch.py").decode()
    assert x.shape == y.shape == (1, 1, 200, 200)
    assert np.array_equal(x, sample_tile(info, 200)) and x.max() > 1  # raw grey values: preprocessing normalises
    model, _ = load_model(tiny_checkpoint)
    with torch.no_grad():  # the checkpoint's U-Net on the tile mirrored by 96 and 100 px, cropped back to 200 px
        padded = torch.nn.functional.pad(info.normalization.apply(torch.from_numpy(x)), (96, 100) * 2, mode="reflect")
        want = torch.softmax(model(padded), dim=1)[:, 1:2, 4:-8, 4:-8].numpy()
    assert np.abs(y - want).max() < 1e-5
    # the architecture file is segkit's source without segkit: torch and the standard library only
    assert not re.search(r"^\s*(from|import) segkit", arch, re.MULTILINE) and "class UNet(nn.Module)" in arch


SMALL_SMP = ("smp:Unet:mobilenet_v2", {"halo": 8, "encoder_depth": 3, "decoder_channels": [16, 8, 4]})


@pytest.mark.parametrize("registered, tile, sizes, halo, pad", [
    (tiny("fcn8s"), 64, (64, 32), 16, (0, 0)),  # multiples of 32, with the smallest output the halo leaves
    (SMALL_SMP, 24, (24, 8), 8, (0, 0)),  # an smp Unet (a small encoder: the test stays fast)
    (tiny("denoiser"), 48, (44, 4), 20, (20, 20)),  # valid convs: its margin mirrored inside, output in raw units
])
def test_fcn_smp_and_denoiser_packages_pass_the_core_test(tmp_path, registered, tile, sizes, halo, pad):
    name, kwargs = registered
    torch.manual_seed(0)
    model = randomize_zero_layers(create_model(name, **kwargs)).eval()
    kind = model_kind(name)
    info = CheckpointInfo(kind, name, kwargs, model.geometry, Normalization(120.0, 40.0),
                          classes=[] if kind == "denoiser" else ["interior", "membrane"],
                          inference={"input_dtype": "uint8"})
    record = build_package(model, info, tmp_path / "m.zip", author="Jane Doe", tile=tile)
    assert record.input_sizes == sizes and (record.halo, record.pad) == (halo, pad)
    assert max(record.weights.values()) < 1e-4
    descr = load(record.path)
    present = {w for w, entry in descr.weights if entry is not None}
    if name.startswith("smp:"):  # its encoder is segmentation-models-pytorch's code: no self-contained architecture
        assert present == {"torchscript", "onnx"} and len(record.checks) == 3
        assert "segmentation-models-pytorch" in record.notes[0] and descr.weights.onnx.parent == "torchscript"
        with zipfile.ZipFile(record.path) as zf:
            assert "arch.py" not in zf.namelist() and "segmentation-models-pytorch" in zf.read("README.md").decode()
    else:
        assert present == {"torchscript", "onnx", "pytorch_state_dict"} and len(record.checks) == 4 and not record.notes
    for axis in descr.inputs[0].axes[2:]:
        assert (axis.size.min, axis.size.step) == sizes
    for axis in descr.outputs[0].axes[2:]:
        assert axis.size.offset == 0 and getattr(axis, "halo", 0) == halo
    if kind == "denoiser":  # the output goes back to raw units
        (scale,) = [p for p in descr.outputs[0].postprocessing if p.id == "scale_linear"]
        assert (scale.kwargs.gain, scale.kwargs.offset) == (40.0, 120.0)
        assert str(descr.outputs[0].id) == "denoised"
    else:
        assert str(descr.outputs[0].id) == "membrane_probability"
    assert no_partials(tmp_path)


def test_weights_that_do_not_reproduce_the_test_output_are_not_written(tmp_path, monkeypatch):
    import segkit.bioimageio.write as bioimageio

    name, kwargs = tiny("fcn8s")
    torch.manual_seed(0)
    model = randomize_zero_layers(create_model(name, **kwargs)).eval()
    info = CheckpointInfo("segmenter", name, kwargs, model.geometry, Normalization(120.0, 40.0))
    state_dict_bytes = bioimageio._state_dict_bytes

    def damaged(m):
        damaged_model = create_model(name, **kwargs)
        damaged_model.load_state_dict({k: v + 0.5 if v.is_floating_point() else v for k, v in m.state_dict().items()})
        return state_dict_bytes(damaged_model)

    monkeypatch.setattr(bioimageio, "_state_dict_bytes", damaged)
    with pytest.raises(PackageError, match=r"fails bioimageio.core's model test with its pytorch_state_dict weights"):
        build_package(model, info, tmp_path / "m.zip", author="Jane Doe", tile=64)
    assert not (tmp_path / "m.zip").exists() and no_partials(tmp_path)


def test_package_user_errors(tmp_path, tiny_checkpoint, monkeypatch):
    out = tmp_path / "m.zip"
    assert_user_error(run("package", tiny_checkpoint, "-o", out), "at least one author", "--author NAME")
    assert_user_error(run("package", tiny_checkpoint, "-o", tmp_path / "m.onnx", "--author", "A"), "with .zip")
    assert_user_error(run("package", tiny_checkpoint, "-o", out, "--author", "A", "--tile", 230),
                      "use --tile 216 or 232")
    assert_user_error(run("package", tiny_checkpoint, "-o", out, "--author", "A", "--maintainer", "Jane Doe"),
                      "not a GitHub user name", "--maintainer GITHUB_USER")
    assert_user_error(run("package", tiny_checkpoint, "-o", out, "--author", "A", "--license", "not-a-license"),
                      "SPDX", "--license MIT")
    assert_user_error(run("package", tiny_checkpoint, "-o", out, "--author", "A", "--name", "a/b"), "--name NAME")
    assert_user_error(run("package", tmp_path / "missing.safetensors", "-o", out, "--author", "A"), "missing")
    out.write_bytes(b"not a package")
    assert_user_error(run("package", tiny_checkpoint, "-o", out, "--author", "A"), "already exists", "--overwrite")
    with pytest.raises(PackageError, match="not a valid bioimage.io package"):
        validate_package(out)
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)
    assert_user_error(run("package", tiny_checkpoint, "-o", tmp_path / "n.zip", "--author", "A"),
                      "pip install segkit-bio[bioimageio]")
    assert no_partials(tmp_path)


# == running packages with segkit's pipeline (segkit.bioimageio.read) =============================

def predict_float(stack, out, model, **kwargs):
    import segkit

    segkit.predict(stack, out, model=model, output_type="float16", overwrite=True, report=lambda _: None, **kwargs)
    import tifffile

    return tifffile.imread(out).astype(np.float32)


@pytest.mark.parametrize("weights", ["onnx", "pytorch_state_dict", "torchscript"])
def test_segkit_runs_its_own_package_as_the_checkpoint(tmp_path, uint8_stack, tiny_checkpoint, unet_package, weights):
    from segkit.bioimageio.read import load_package

    engine = load_package(unet_package[0], weights=weights, device="cpu", trust_model_code=weights == "torchscript")
    assert engine.info.inference.input_dtype == "uint8"
    assert abs(engine.info.normalization.mean - 120) < 1e-4 and abs(engine.info.normalization.std - 40) < 1e-4
    if weights == "pytorch_state_dict":  # segkit's own registry and the checkpoint's record, not arch.py
        assert engine.plan.from_record and engine.info == read_info(tiny_checkpoint)
        tile = 236
    else:  # the package's description: its model mirrors the margin inside, a same-size output with a 92 px halo
        assert not engine.plan.from_record
        assert (engine.geometry.margin, engine.geometry.min_input, engine.geometry.halo) == (0, 200, 92)
        tile = 232
    got = predict_float(uint8_stack, tmp_path / "package.tif", engine, tile=tile)
    want = predict_float(uint8_stack, tmp_path / "checkpoint.tif", tiny_checkpoint, tile=236, device="cpu")
    diff = np.abs(got - want)
    assert got.shape == want.shape == (3, 70, 91)
    if weights == "pytorch_state_dict":
        assert diff.max() < 2e-3  # the checkpoint itself: float16 rounding only
    else:  # segkit blends the tiles over the declared 92 px halo, where the package's own mirroring is approximate
        assert diff.max() < 0.05 and diff.mean() < 5e-3, (diff.max(), diff.mean())


def test_predict_takes_a_package_as_its_model(tmp_path, uint8_stack, tiny_checkpoint, unet_package):
    """`segkit predict -m package.zip`: the package's weights, geometry and normalisation, through the
    streaming pipeline, give what the checkpoint gives; options a package brings itself are refused."""
    import tifffile

    out = tmp_path / "from_package.tif"
    result = run("predict", uint8_stack, "-m", unet_package[0], "-o", out, "--tile", 236, "--output-type", "float16",
                 "--device", "cpu", "-q")  # the checkpoint's tile: segkit runs its package from the record
    assert result.exit_code == 0, result.output
    want = predict_float(uint8_stack, tmp_path / "checkpoint.tif", tiny_checkpoint, tile=236, device="cpu")
    assert np.abs(tifffile.imread(out).astype(np.float32) - want).max() < 2e-3
    assert_user_error(run("predict", uint8_stack, "-m", unet_package[0], "-o", tmp_path / "t.tif", "--tta", "flips"),
                      "--tta flips does not apply to a bioimage.io package")


def test_predict_from_a_package_takes_the_tile_it_records(tmp_path, uint8_stack, unet_package):
    """Without --tile, `predict -m package.zip` runs segkit's own package at its checkpoint's trained tile
    (config.segkit.checkpoint: 236, as the checkpoint runs; it used to take 572) and says so; its
    description (ONNX weights) at the package's test tile (config.segkit.test_tile); --tile decides."""
    from segkit.bioimageio.read import plan_package

    result = run("predict", uint8_stack, "-m", unet_package[0], "-o", tmp_path / "p.tif", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    assert "tiles of 236 px, batch" in result.stderr, result.stderr
    assert ("note: tiles of 236 px, the tile its checkpoint was trained with (config.segkit.checkpoint.inference.tile); "
            "--tile N sets another") in result.stderr
    result = run("predict", uint8_stack, "-m", unet_package[0], "-o", tmp_path / "q.tif", "--device", "cpu", "-q",
                 "--tile", 252)
    assert result.exit_code == 0, result.output
    assert "tiles of 252 px, batch" in result.stderr and "note: tiles of" not in result.stderr
    plan = plan_package(unet_package[0], weights="onnx")[1]
    assert plan.info.inference.tile == 200 and "the package's test tile (config.segkit.test_tile)" in plan.tile_note


def test_predict_from_a_foreign_package_takes_its_test_inputs_size(tmp_path, uint8_stack):
    """A package without segkit's record: the size of its test input (64 px; it used to take 512, segkit's
    default for 32 + 16n), else segkit's default, said in a note; tile=N decides."""
    import segkit
    from segkit.bioimageio.read import plan_package

    package, _, _ = foreign_package(tmp_path, classes=1, onnx=False)
    notes = []
    result = segkit.predict(uint8_stack, tmp_path / "p.tif", model=package, trust_model_code=True, device="cpu",
                            report=notes.append)
    assert result.tile == 64
    assert any("tiles of 64 px, the size of the package's test input (inputs[0].test_tensor, 64 x 64 px); tile=N "
               "sets another" in note for note in notes), notes
    assert segkit.predict(uint8_stack, tmp_path / "q.tif", model=package, trust_model_code=True, device="cpu",
                          tile=48, report=lambda _: None).tile == 48
    bare = tmp_path / "bare.zip"
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(bare, "w") as dst:
        for name in src.namelist():
            if name != "in.npy":  # named by the description, not in the package
                dst.writestr(name, src.read(name))
    plan = plan_package(bare, trust_model_code=True)[1]
    assert plan.info.inference.tile == 512 and "the package records no tile" in plan.tile_note


def test_a_model_object_runs_a_package_on_arrays_as_predict_does(tmp_path, uint8_stack, unet_package):
    import tifffile

    import segkit

    model = segkit.Model(unet_package[0], tile=236, device="cpu", report=None)
    got = model.predict(tifffile.imread(uint8_stack), axes="ZYX")
    want = predict_float(uint8_stack, tmp_path / "package.tif", unet_package[0], tile=236, device="cpu")
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() < 2e-3  # float16 rounding of the TIFF only


TINY_NET = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """Not a segkit model: 3x3 conv, ReLU, 1x1 conv to two class scores (same size out)."""

    def __init__(self, width=4, classes=2):
        super().__init__()
        self.a = nn.Conv2d(1, width, 3, padding=1)
        self.b = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))
'''


def foreign_package(folder, *, classes=2, onnx=True):
    """A package made with bioimageio.spec alone for a model that is not segkit's: scale_linear then
    fixed_zero_mean_unit_variance in, two channels with a softmax out (`classes=1`: one with a sigmoid),
    a halo of 8, a 64 x 64 test input, ONNX (unless `onnx=False`) and pytorch_state_dict (architecture
    from a file) weights. Returns (zip, the torch model, its normalisation)."""
    import importlib.util

    from bioimageio.spec import save_bioimageio_package

    (folder / "tiny_net.py").write_text(TINY_NET)
    spec_ = importlib.util.spec_from_file_location("tiny_net", folder / "tiny_net.py")
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    torch.manual_seed(0)
    net = module.TinyNet(width=4, classes=classes).eval()
    torch.save(net.state_dict(), folder / "weights.pt")
    if onnx:
        with torch.no_grad():
            torch.onnx.export(net, (torch.zeros(1, 1, 64, 64),), str(folder / "weights.onnx"), dynamo=False,
                              opset_version=17, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b", 2: "h", 3: "w"}})
    x = np.random.default_rng(0).integers(0, 256, (1, 1, 64, 64)).astype(np.float32)
    normalize = lambda a: ((a * (1 / 255) + 0) - 0.5) / (0.25 + 1e-6)  # noqa: E731  (as bioimageio.core computes)
    with torch.no_grad():
        logits = net(torch.from_numpy(normalize(x).astype(np.float32)))
        y = (torch.softmax(logits, dim=1) if classes > 1 else torch.sigmoid(logits)).numpy()
    np.save(folder / "in.npy", x)
    np.save(folder / "out.npy", y)
    s = v0_5
    space = [s.SpaceInputAxis(id=s.AxisId(a), size=s.ParameterizedSize(min=32, step=16)) for a in "yx"]
    out_space = [s.SpaceOutputAxisWithHalo(id=s.AxisId(a), halo=8, size=s.SizeReference(
        tensor_id=s.TensorId("image"), axis_id=s.AxisId(a))) for a in "yx"]
    names, post = ([s.Identifier("bg"), s.Identifier("fg")], s.SoftmaxDescr(kwargs=s.SoftmaxKwargs(axis=s.AxisId("channel")))
                   ) if classes > 1 else ([s.Identifier("fg")], s.SigmoidDescr())
    weights = {"pytorch_state_dict": s.PytorchStateDictWeightsDescr(
        source=folder / "weights.pt", pytorch_version=s.Version(torch.__version__.split("+")[0]),
        architecture=s.ArchitectureFromFileDescr(source=folder / "tiny_net.py", callable=s.Identifier("TinyNet"),
                                                 kwargs={"width": 4} if classes == 2 else {"width": 4, "classes": classes}))}
    if onnx:
        weights["onnx"] = s.OnnxWeightsDescr(source=folder / "weights.onnx", opset_version=17, parent="pytorch_state_dict")
    descr = s.ModelDescr(
        name="tiny foreign net", description="a two-class net made without segkit",
        authors=[s.Author(name="Someone Else")], cite=[s.CiteEntry(text="U-Net", doi=s.Doi("10.1007/978-3-319-24574-4_28"))],
        license=s.LicenseId("MIT"),
        inputs=[s.InputTensorDescr(
            id=s.TensorId("image"), axes=[s.BatchAxis(), s.ChannelAxis(channel_names=[s.Identifier("gray")]), *space],
            test_tensor=s.FileDescr(source=folder / "in.npy"),
            preprocessing=[s.ScaleLinearDescr(kwargs=s.ScaleLinearKwargs(gain=1 / 255)),
                           s.FixedZeroMeanUnitVarianceDescr(kwargs=s.FixedZeroMeanUnitVarianceKwargs(mean=0.5, std=0.25))])],
        outputs=[s.OutputTensorDescr(
            id=s.TensorId("classes"), axes=[s.BatchAxis(), s.ChannelAxis(channel_names=names), *out_space],
            test_tensor=s.FileDescr(source=folder / "out.npy"), postprocessing=[post])],
        weights=s.WeightsDescr(**weights),
    )
    return save_bioimageio_package(descr, output_path=folder / "foreign.zip"), net, normalize


@pytest.mark.parametrize("weights", ["onnx", "pytorch_state_dict"])
def test_segkit_runs_a_foreign_package_through_its_pipeline(tmp_path, uint8_stack, weights):
    import tifffile

    from segkit.bioimageio.read import load_package
    from segkit.errors import SegkitError

    package, net, normalize = foreign_package(tmp_path)
    with pytest.raises(SegkitError, match=r"outputs\[0\]\.axes\[channel\]: 2 output channels \(bg, fg\); pass channel=N"):
        load_package(package, weights=weights, device="cpu", trust_model_code=weights != "onnx")
    engine = load_package(package, weights=weights, channel=1, device="cpu", trust_model_code=weights != "onnx")
    assert (engine.geometry.margin, engine.geometry.step, engine.geometry.min_input, engine.geometry.halo) == (0, 16, 32, 8)
    got = predict_float(uint8_stack, tmp_path / "out.tif", engine, tile=48)  # many tiles, blended over the halo
    planes = tifffile.imread(uint8_stack).astype(np.float32)
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy(normalize(planes[:, None]).astype(np.float32))), dim=1)[:, 1].numpy()
    # inside the 1 px border (where the net's zero padding meets segkit's mirrored plane) tiling changes nothing
    assert np.abs(got - want)[:, 1:-1, 1:-1].max() < 2e-3


def bare_descr(folder, *, axes="yx", preprocessing=(), weights="onnx"):
    """A package description without test tensors, for the checks that refuse it."""
    s = v0_5
    (folder / "w.bin").write_bytes(b"0")
    space = [s.SpaceInputAxis(id=s.AxisId(a), size=s.ParameterizedSize(min=32, step=16)) for a in axes]
    out = [s.SpaceOutputAxis(id=s.AxisId(a), size=s.SizeReference(tensor_id=s.TensorId("image"), axis_id=s.AxisId(a)))
           for a in axes]
    entry = {"onnx": lambda: s.OnnxWeightsDescr(source=folder / "w.bin", opset_version=17),
             "keras_hdf5": lambda: s.KerasHdf5WeightsDescr(source=folder / "w.bin", tensorflow_version=s.Version("2.15"))}
    from bioimageio.spec import ValidationContext

    with ValidationContext(perform_io_checks=False):
        return s.ModelDescr(
            name="a model segkit refuses", description="d", authors=[s.Author(name="A")], license=s.LicenseId("MIT"),
            cite=[s.CiteEntry(text="U-Net", doi=s.Doi("10.1007/978-3-319-24574-4_28"))],
            inputs=[s.InputTensorDescr(id=s.TensorId("image"), axes=[s.BatchAxis(), s.ChannelAxis(
                channel_names=[s.Identifier("gray")]), *space], preprocessing=list(preprocessing))],
            outputs=[s.OutputTensorDescr(id=s.TensorId("p"), axes=[s.BatchAxis(), s.ChannelAxis(
                channel_names=[s.Identifier("fg")]), *out])],
            weights=s.WeightsDescr(**{weights: entry[weights]()}))


def test_packages_segkit_cannot_run_get_one_line_naming_the_field(tmp_path):
    from segkit.bioimageio.read import load_package, plan_package
    from segkit.errors import SegkitError

    s = v0_5
    cases = [
        (bare_descr(tmp_path, axes="zyx"), r"inputs\[0\]\.axes: a 3D model \(axis z\)"),
        (bare_descr(tmp_path, preprocessing=[s.ScaleRangeDescr(kwargs=s.ScaleRangeKwargs(
            axes=[s.AxisId("y"), s.AxisId("x")], min_percentile=1, max_percentile=99.8))]),
         r"inputs\[0\]\.preprocessing\[1\]: 'scale_range' is not supported"),
        (bare_descr(tmp_path, preprocessing=[s.ZeroMeanUnitVarianceDescr()]),
         r"inputs\[0\]\.preprocessing\[1\]: 'zero_mean_unit_variance' is not supported"),
        (bare_descr(tmp_path, weights="keras_hdf5"), r"field weights: keras_hdf5; segkit runs onnx, pytorch_state_dict"),
    ]
    for descr, message in cases:
        with pytest.raises(SegkitError, match=message) as caught:
            plan_package(descr)
        assert "\n" not in str(caught.value)
    plan_package(bare_descr(tmp_path))  # the same description with 2D axes, no preprocessing and ONNX weights is fine
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(SegkitError, match="is not a bioimage.io package"):
        load_package(garbage)
    with pytest.raises(SegkitError, match="does not exist"):
        load_package(tmp_path / "missing.zip")


def test_package_environment_asks_for_no_segkit(unet_package):
    """The pytorch_state_dict weights' environment is PyTorch alone: the architecture is arch.py inside the
    package (`segkit` on PyPI is an unrelated project, and segkit-bio is not needed either)."""
    import yaml

    out, result = unet_package
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(out) as zf:
        env = yaml.safe_load(zf.read("environment.yaml"))
    assert not [d for d in env["dependencies"] if isinstance(d, dict) or "segkit" in str(d)], env
    assert any(str(d).startswith("pytorch>=") for d in env["dependencies"])


# == segkit's packages without segkit, tiled in bioimageio.core ====================================

WITHOUT_SEGKIT = """
import sys
sys.modules["segkit"] = None  # `import segkit` (and any segkit.*) now raises ImportError
from bioimageio.core import test_description
from bioimageio.spec._internal.constants import KNOWN_GITHUB_USERS
KNOWN_GITHUB_USERS.update({"jane-doe", "jroe"})  # offline here: bioimageio.spec would ask GitHub's API
for weight_format in sys.argv[2:]:
    summary = test_description(sys.argv[1], weight_format=weight_format,
                               devices=["CPUExecutionProvider"] if weight_format == "onnx" else ["cpu"])
    failed = [d.name + ": " + str(d.errors[0].msg)[:300] for d in summary.details if d.status == "failed" and d.errors]
    print(weight_format, summary.status, failed)
"""


def test_bioimageio_test_passes_for_every_weight_format_without_segkit(tmp_path, unet_package):
    """bioimageio.core's model test in a process that cannot import segkit: pytorch_state_dict builds
    its architecture from the package's arch.py, TorchScript and ONNX need nothing else."""
    import subprocess

    out, result = unet_package
    assert result.exit_code == 0, result.output
    formats = ["pytorch_state_dict", "torchscript", "onnx"]
    done = subprocess.run([sys.executable, "-c", WITHOUT_SEGKIT, str(out), *formats], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:3] == [f"{w} passed []" for w in formats], done.stdout + done.stderr[-2000:]


def test_segkit_never_runs_the_architecture_file_of_its_own_package(tmp_path, uint8_stack, tiny_checkpoint,
                                                                     unet_package):
    """A segkit package whose arch.py is replaced by code that writes a file and raises (with rdf.yaml's
    sha256 updated, so the package is still valid) predicts from the record as before, and the code never ran."""
    import hashlib

    out, _ = unet_package
    witness = tmp_path / "arch_ran.txt"
    evil = (f"open({str(witness)!r}, 'w').write('ran')\n"
            "raise RuntimeError('arch.py was executed')\n"
            "def packaged_model(**kwargs):\n    raise RuntimeError('arch.py was called')\n").encode()
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(out) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "arch.py":
                old_sha, data = hashlib.sha256(data).hexdigest(), evil
            dst.writestr(item, data)
        rdf = src.read("rdf.yaml").decode()
    assert old_sha in rdf
    rebuilt = tmp_path / "evil.zip"
    with zipfile.ZipFile(tampered) as src, zipfile.ZipFile(rebuilt, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "rdf.yaml":
                data = data.decode().replace(old_sha, hashlib.sha256(evil).hexdigest()).encode()
            dst.writestr(item, data)
    result = run("predict", uint8_stack, "-m", rebuilt, "-o", tmp_path / "p.tif", "--tile", 236, "--output-type",
                 "float16", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    want = predict_float(uint8_stack, tmp_path / "checkpoint.tif", tiny_checkpoint, tile=236, device="cpu")
    import tifffile

    assert np.abs(tifffile.imread(tmp_path / "p.tif").astype(np.float32) - want).max() < 2e-3
    assert not witness.exists()


def checkpoint_of(folder, name, kwargs, normalization, *, classes=("interior", "membrane"), **inference):
    """A saved checkpoint of a tiny registry model with random (nonzero) weights: (path, model, record)."""
    from segkit.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = randomize_zero_layers(create_model(name, **kwargs)).eval()
    info = CheckpointInfo(model_kind(name), name, kwargs, model.geometry, normalization, classes=list(classes),
                          inference={"input_dtype": "uint8", **inference})
    path = folder / f"{name.replace(':', '_')}.safetensors"
    save_checkpoint(path, model, info)
    return path, model, info


def core_predict(package, image, blocksize):
    """bioimageio.core's prediction of a (H, W) image, tiled by `blocksize` (the ParameterizedSize n): (C, H, W)."""
    from bioimageio.core import Tensor, load_description, predict

    descr = load_description(str(package), perform_io_checks=False)
    tensor = Tensor.from_numpy(image[None, None].astype(np.float32), dims=("batch", "channel", "y", "x"))
    with _quiet():
        sample = predict(model=descr, inputs={"raw": tensor}, blocksize_parameter=blocksize)
    (output,) = sample.members.values()
    return np.asarray(output.data)[0]


def _quiet():
    from segkit.bioimageio.write import _quiet_bioimageio

    return _quiet_bioimageio()


def segkit_predict(tmp_path, image, checkpoint, tile):
    """segkit's own tiled prediction of a (H, W) uint8 image from a checkpoint, float16 written: (C, H, W)."""
    import tifffile

    source = tmp_path / "image.tif"
    tifffile.imwrite(source, image)
    got = predict_float(source, tmp_path / "segkit.tif", checkpoint, tile=tile, device="cpu")
    return got if got.ndim == 3 else got[None]


def isbi_plane(height, width):
    import tifffile

    from segkit.bioimageio.write import SAMPLE

    return np.ascontiguousarray(tifffile.imread(SAMPLE)[2, :height, :width])


def test_core_tiles_the_paper_unet_package_as_segkit_does(tmp_path, tiny_checkpoint, unet_package):
    """bioimageio.core's tiled prediction of the valid-conv U-Net's package equals segkit's own tiled
    output: every output pixel sees the same context (the image mirrored at its border, reflect in
    both) on the same 16 px pooling grid, so they agree to the float16 rounding of segkit's written
    probabilities (half a step at 1.0 is 2.5e-4). blocksize_parameter 0 is core's default (10: 360 px
    blocks, 4 of them here), 4 gives 264 px blocks (25)."""
    image = isbi_plane(368, 384)  # a multiple of the step (core shifts its last block back to the edge)
    want = segkit_predict(tmp_path, image, tiny_checkpoint, 236)
    for n in (0, 4):
        got = core_predict(unet_package[0], image, n)
        assert got.shape == want.shape == (1, 368, 384)
        assert np.abs(got - want).max() < 1e-3, (n, np.abs(got - want).max())


def test_core_tiles_a_same_padding_package_close_to_segkit(tmp_path):
    """A same-padding FCN: core crops the 16 px halo from each block and stitches, segkit blends its tiles
    over the halo. Neither equals the whole-image output (a tile border's zero padding reaches past the
    halo; with random weights, a lot), so core's tiling is held to segkit's own: at most 1.5 times as far
    from the whole-image output as segkit's tiled output (measured: 0.04-0.06 vs 0.06 mean, 0.25-0.26
    vs 0.23 max)."""
    name, kwargs = tiny("fcn8s")
    checkpoint, model, info = checkpoint_of(tmp_path, name, kwargs, Normalization(120.0, 40.0))
    package = package_checkpoint_quietly(checkpoint, tmp_path / "m.zip")
    image = isbi_plane(384, 416)
    tiled = segkit_predict(tmp_path, image, checkpoint, 96)
    with torch.no_grad():
        x = torch.from_numpy(info.normalization.apply(image.astype(np.float32)))[None, None]
        whole = torch.softmax(model(x), dim=1)[0, 1:2].numpy()
    segkit_error = np.abs(tiled - whole)
    for n in (0, 2):
        got = core_predict(package, image, n)
        assert got.shape == tiled.shape == (1, 384, 416)
        core_error = np.abs(got - whole)
        assert core_error.mean() < 1.5 * segkit_error.mean(), (n, core_error.mean(), segkit_error.mean())
        assert core_error.max() < 1.5 * segkit_error.max(), (n, core_error.max(), segkit_error.max())


def package_checkpoint_quietly(checkpoint, out, **kwargs):
    from segkit.bioimageio.write import package_checkpoint

    return package_checkpoint(checkpoint, out, author="Jane Doe", maintainer="jane-doe", **kwargs).path


@pytest.mark.parametrize("normalization, classes, labels_kind", [
    # percentile rule (CSBDeep style, clipped): scale_range over y and x, then clip
    (Normalization(0.0, 1.0, percentiles=(1.0, 99.8), clip=True), ("interior", "membrane"), "membrane"),
    # three classes: a softmax output with a channel per class, named from the record
    (Normalization(120.0, 40.0), ("background", "cell", "cell boundary"), "semantic"),
])
def test_percentile_and_k_class_models_package_and_match_segkit(tmp_path, normalization, classes, labels_kind):
    kwargs = {"base": 4, "depth": 2, "classes": len(classes)}
    checkpoint, model, info = checkpoint_of(tmp_path, "unet", kwargs, normalization, classes=classes,
                                            labels_kind=labels_kind)
    package = package_checkpoint_quietly(checkpoint, tmp_path / "m.zip", tile=None)
    descr = load(package)  # valid, and package_checkpoint passed bioimageio.core's test of all three formats
    (raw,), (out,) = descr.inputs, descr.outputs
    steps = [p.id for p in raw.preprocessing if p.id != "ensure_dtype"]
    if normalization.percentiles:
        assert steps == ["scale_range", "clip"]
        assert (raw.preprocessing[1].kwargs.min_percentile, raw.preprocessing[1].kwargs.max_percentile) == (1.0, 99.8)
        assert [str(a) for a in raw.preprocessing[1].kwargs.axes] == ["y", "x"]
    else:
        assert steps == ["fixed_zero_mean_unit_variance"]
        assert str(out.id) == "probabilities"
        assert [str(c) for c in out.axes[1].channel_names] == ["background", "cell", "cell_boundary"]
    image = isbi_plane(264, 272)
    want = segkit_predict(tmp_path, image, checkpoint, 236)
    got = core_predict(package, image, 0)
    assert got.shape == want.shape == (len(classes) if labels_kind == "semantic" else 1, 264, 272)
    # float16 output; percentiles: segkit and core both use numpy's linear interpolation on the whole image
    assert np.abs(got - want).max() < 1e-3


def test_a_package_engine_passed_to_predict_takes_the_tile_it_records(tmp_path, uint8_stack, unet_package):
    """`segkit.predict(..., model=load_package(...))` runs at the tile the package records (its checkpoint's
    trained tile, 236), as `-m package.zip` does, not at the geometry's default; tile=N still decides."""
    import segkit
    from segkit.bioimageio.read import load_package

    engine = load_package(unet_package[0], device="cpu")
    assert segkit.predict(uint8_stack, tmp_path / "p.tif", model=engine, device="cpu", progress=False).tile == 236
    assert segkit.predict(uint8_stack, tmp_path / "q.tif", model=engine, device="cpu", progress=False,
                          tile=252).tile == 252
