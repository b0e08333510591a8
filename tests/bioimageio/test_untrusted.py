"""Untrusted bioimage.io packages: hostile packages built here (from a foreign package made with
bioimageio.spec alone, and from segkit's own package with its record removed) never run their code
without the opt-in (`--trust-model-code`, `trust_model_code=True`), never reach files outside the
package, are refused before a zip bomb or a YAML alias bomb is expanded, and bad `config.segkit`
values give one line."""

import hashlib
import time
import tracemalloc
import warnings
import zipfile

import pytest
import yaml

pytest.importorskip("bioimageio.spec", reason="needs the bioimageio extra: pip install 'segkit-bio[bioimageio]'")
pytest.importorskip("bioimageio.core", reason="needs the bioimageio extra: pip install 'segkit-bio[bioimageio]'")

from segkit.bioimageio.read import load_package, plan_package  # noqa: E402
from segkit.errors import SegkitError  # noqa: E402
from tests.bioimageio.test_packages import TINY_NET, foreign_package  # noqa: E402
from tests.helpers import assert_user_error, run  # noqa: E402

OPT_IN = "--trust-model-code"


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A foreign package (ONNX and pytorch_state_dict with tiny_net.py) and its TorchScript weights file."""
    import torch

    folder = tmp_path_factory.mktemp("foreign")
    package, net, _ = foreign_package(folder)
    torch.jit.script(net).save(str(folder / "scripted.pt"))
    return package, (folder / "scripted.pt").read_bytes()


def repack(package, out, edit=None, *, drop=(), add=None):
    """A copy of `package` with rdf.yaml edited (edit(dict) changes it in place), members dropped or added."""
    add = dict(add or {})
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            if name in drop or name in add:
                continue
            data = src.read(name)
            if name == "rdf.yaml" and edit is not None:
                rdf = yaml.safe_load(data)
                edit(rdf)
                data = yaml.safe_dump(rdf, sort_keys=False).encode()
            dst.writestr(name, data)
        for name, data in add.items():
            dst.writestr(name, data)
    return out


def without_onnx(rdf):
    del rdf["weights"]["onnx"]


def message(call):
    with pytest.raises(SegkitError) as caught:
        call()
    text = str(caught.value)
    assert "\n" not in text, text
    return text


def test_an_architecture_file_runs_only_with_the_opt_in(tmp_path, foreign, uint8_stack):
    marker = tmp_path / "arch_ran.txt"
    code = f"open({str(marker)!r}, 'w').write('ran')\n{TINY_NET}".encode()

    def edit(rdf):
        without_onnx(rdf)
        rdf["weights"]["pytorch_state_dict"]["architecture"]["sha256"] = hashlib.sha256(code).hexdigest()

    package = repack(foreign[0], tmp_path / "arch.zip", edit, drop=("weights.onnx",), add={"tiny_net.py": code})
    result = run("predict", uint8_stack, "-m", package, "-o", tmp_path / "p.tif", "--device", "cpu", "-q")
    assert_user_error(result, "weights.pytorch_state_dict.architecture.source: tiny_net.py", OPT_IN,
                      "no ONNX weights")
    assert not marker.exists()
    notes = []
    engine = load_package(package, channel=1, device="cpu", trust_model_code=True, report=notes.append)
    assert marker.read_text() == "ran" and engine.plan.weights == "pytorch_state_dict"
    assert len(notes) == 1 and "tiny_net.py" in notes[0] and "running the Python code" in notes[0]


def test_import_from_a_library_never_runs_without_the_opt_in(tmp_path, foreign, uint8_stack):
    marker = tmp_path / "system_ran.txt"

    def edit(rdf):
        without_onnx(rdf)
        rdf["weights"]["pytorch_state_dict"]["architecture"] = {
            "import_from": "os", "callable": "system", "kwargs": {"command": f"touch {marker}"}}

    package = repack(foreign[0], tmp_path / "system.zip", edit, drop=("weights.onnx",))
    result = run("predict", uint8_stack, "-m", package, "-o", tmp_path / "p.tif", "--device", "cpu", "-q")
    assert_user_error(result, "weights.pytorch_state_dict.architecture.import_from: os.system", OPT_IN)
    assert "no ONNX weights" in message(lambda: load_package(package, channel=1, device="cpu"))
    assert not marker.exists()


def test_a_package_with_onnx_weights_runs_them_and_not_its_code(tmp_path, foreign):
    marker = tmp_path / "system_ran.txt"

    def edit(rdf):
        rdf["weights"]["pytorch_state_dict"]["architecture"] = {
            "import_from": "os", "callable": "system", "kwargs": {"command": f"touch {marker}"}}

    package = repack(foreign[0], tmp_path / "both.zip", edit)
    assert load_package(package, channel=1, device="cpu").plan.weights == "onnx"
    text = message(lambda: load_package(package, weights="pytorch_state_dict", channel=1, device="cpu"))
    assert "architecture.import_from" in text and "weights='onnx'" in text
    assert not marker.exists()


def test_torchscript_weights_need_the_opt_in(tmp_path, foreign):
    import torch

    def edit(rdf):
        rdf["weights"] = {"torchscript": {"source": "scripted.pt",
                                          "pytorch_version": torch.__version__.split("+")[0]}}

    package = repack(foreign[0], tmp_path / "ts.zip", edit, drop=("weights.onnx", "weights.pt", "tiny_net.py"),
                     add={"scripted.pt": foreign[1]})
    text = message(lambda: load_package(package, channel=1, device="cpu"))
    assert "weights.torchscript.source: scripted.pt" in text and "trust_model_code=True" in text
    assert "no ONNX weights" in text
    with warnings.catch_warnings(record=True) as caught:  # torch's FutureWarning for torch.jit.load is not shown
        warnings.simplefilter("always")
        engine = load_package(package, channel=1, device="cpu", trust_model_code=True)
    assert engine.plan.weights == "torchscript"
    assert not [w for w in caught if "torch.jit" in str(w.message)], [str(w.message) for w in caught]


def test_a_segkit_package_without_its_record_is_foreign(tmp_path, tiny_checkpoint, uint8_stack):
    """segkit's package with config.segkit removed and no ONNX weights: its arch.py is a foreign package's code."""
    from segkit.bioimageio.write import package_checkpoint

    built = tmp_path / "unet.zip"
    package_checkpoint(tiny_checkpoint, built, tile=200, author="Jane Doe", test=False, report=lambda _: None)

    def edit(rdf):
        rdf.get("config", {}).pop("segkit", None)
        rdf["weights"] = {"pytorch_state_dict": rdf["weights"]["pytorch_state_dict"]}

    package = repack(built, tmp_path / "bare.zip", edit)
    result = run("predict", uint8_stack, "-m", package, "-o", tmp_path / "p.tif", "--device", "cpu", "-q")
    assert_user_error(result, "weights.pytorch_state_dict.architecture.source: arch.py", OPT_IN, "no ONNX weights")
    assert not (tmp_path / "p.tif").exists()

    def torchscript_only(rdf):
        rdf["weights"] = {"torchscript": rdf["weights"]["torchscript"]}
        rdf["weights"]["torchscript"].pop("parent", None)

    scripted = repack(built, tmp_path / "scripted.zip", torchscript_only)
    result = run("predict", uint8_stack, "-m", scripted, "-o", tmp_path / "p.tif", "--device", "cpu", "-q")
    assert_user_error(result, "weights.torchscript.source", OPT_IN)
    result = run("predict", uint8_stack, "-m", scripted, "-o", tmp_path / "p.tif", "--device", "cpu", "-q",
                 "--tile", 232, OPT_IN)
    assert result.exit_code == 0, result.output
    assert "running the Python code of package scripted.zip (weights.torchscript.source" in result.stderr
    assert (tmp_path / "p.tif").exists()


@pytest.mark.parametrize("where", ["absolute", "folder"])
def test_files_outside_the_package_are_never_read(tmp_path, foreign, where):
    secret = tmp_path / "secret.onnx"
    secret.write_bytes(b"not for packages " * 100)
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    source = {"absolute": str(secret), "folder": "../secret.onnx"}[where]

    def edit(rdf):
        rdf["weights"] = {"onnx": dict(rdf["weights"]["onnx"], source=source, sha256=digest)}
        rdf["weights"]["onnx"].pop("parent", None)

    inner = tmp_path / "pkg"
    inner.mkdir()
    package = repack(foreign[0], inner / "outside.zip", edit, drop=("weights.onnx",))
    if where == "folder":  # an unpacked package: rdf.yaml beside its files, the secret one folder up
        with zipfile.ZipFile(package) as zf:
            zf.extractall(inner)
        package = inner / "rdf.yaml"
    text = message(lambda: load_package(package, channel=1, device="cpu"))
    assert digest not in text and "not for packages" not in text
    assert "field weights.onnx.source" in text and "from the package only" in text, text


def patch_sizes(path, names, size):
    """Make the zip's directory declare `size` uncompressed bytes for `names` (the data stays small)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
    position = 0
    while (position := data.find(b"PK\x01\x02", position)) >= 0:
        name_length = int.from_bytes(data[position + 28:position + 30], "little")
        name = data[position + 46:position + 46 + name_length].decode()
        if name in names and name in infos:
            data[position + 24:position + 28] = size.to_bytes(4, "little")
        position += 4
    path.write_bytes(bytes(data))


def test_a_zip_bomb_is_refused_before_anything_is_unpacked(tmp_path, foreign):
    package = repack(foreign[0], tmp_path / "bomb.zip")
    patch_sizes(package, {"weights.onnx", "weights.pt", "in.npy"}, 0xFFFF0000)  # 12 GiB declared in all
    tracemalloc.start()
    start = time.perf_counter()
    try:
        text = message(lambda: load_package(package, channel=1, device="cpu"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "unpacks to" in text and "zip bomb" in text, text
    assert time.perf_counter() - start < 10 and peak < 50 << 20, peak


def test_too_many_members_links_and_outside_names_are_refused(tmp_path, foreign):
    many = repack(foreign[0], tmp_path / "many.zip", add={f"f/{i}": b"" for i in range(10_001)})
    assert "10007 files" in message(lambda: plan_package(many))
    link = zipfile.ZipInfo("weights.onnx")
    link.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(foreign[0]) as src, zipfile.ZipFile(tmp_path / "link.zip", "w") as dst:
        for name in src.namelist():
            if name == "weights.onnx":
                dst.writestr(link, "/etc/passwd")
            else:
                dst.writestr(name, src.read(name))
    assert "a symbolic link" in message(lambda: plan_package(tmp_path / "link.zip"))
    outside = repack(foreign[0], tmp_path / "dots.zip", add={"../evil.txt": b"x"})
    assert "a name outside the package" in message(lambda: plan_package(outside))


def test_an_alias_bomb_under_config_is_refused_quickly(tmp_path, foreign):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)]  # 10^6 values expanded
    bomb = "config:\n  bomb:\n" + "".join(f"    {line}\n" for line in levels)
    with zipfile.ZipFile(foreign[0]) as src, zipfile.ZipFile(tmp_path / "alias.zip", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "rdf.yaml":
                rdf = yaml.safe_load(data)
                rdf.pop("config", None)
                data = (yaml.safe_dump(rdf, sort_keys=False) + bomb).encode()
            dst.writestr(name, data)
    start = time.perf_counter()
    text = message(lambda: plan_package(tmp_path / "alias.zip"))
    assert "alias" in text and time.perf_counter() - start < 10, text


@pytest.fixture(scope="module")
def own(tmp_path_factory, foreign, tiny_checkpoint):
    """A package segkit runs from its record, as its own: the foreign package's description and files with
    the tiny U-Net's state dict as weights.pt and its record in config.segkit (what `segkit package` writes
    there), made in well under a second instead of packaging the checkpoint."""
    import io
    import json

    import torch

    from segkit.checkpoint import load_model

    model, info = load_model(tiny_checkpoint)
    buffer = io.BytesIO()
    torch.save({f"model.{k}": v for k, v in model.state_dict().items()}, buffer)

    def edit(rdf):
        rdf["config"] = {"segkit": {"checkpoint": json.loads(info.to_json()), "test_tile": 64, "pad": [0, 0]}}
        rdf["weights"] = {"pytorch_state_dict": dict(rdf["weights"]["pytorch_state_dict"], sha256=None)}
        rdf["weights"]["pytorch_state_dict"].pop("sha256")

    return repack(foreign[0], tmp_path_factory.mktemp("own") / "own.zip", edit, drop=("weights.onnx",),
                  add={"weights.pt": buffer.getvalue()})


def merged(base, change):
    """`base` with the mappings of `change` merged in, key by key (other values replace)."""
    if not isinstance(base, dict) or not isinstance(change, dict):
        return change
    return {**base, **{key: merged(base.get(key), value) for key, value in change.items()}}


def test_the_own_package_runs_from_its_record(own):
    _, plan = plan_package(own)
    assert plan.from_record and plan.info.model == "unet" and plan.info.inference.tile == 236


CONFIG_CASES = [
    ("abc", "config.segkit: is a str"),
    ({"checkpoint": "abc"}, "config.segkit.checkpoint: is a str"),
    ({"checkpoint": {"classes": 123}}, "config.segkit.checkpoint.classes: 123 is not a list of class names"),
    ({"checkpoint": {"inference": [1, 2]}}, "config.segkit.checkpoint.inference: is a list"),
    ({"checkpoint": {"inference": {"threshold": "abc"}}}, "inference threshold 'abc' is not a number"),
    ({"checkpoint": {"inference": {"watershed": {"threshold": "x"}}}},
     "config.segkit.checkpoint.inference.watershed: threshold: 'x' is not a number"),
    ({"checkpoint": {"kind": 5}}, "config.segkit.checkpoint.kind"),
]


@pytest.mark.parametrize("config, field", CONFIG_CASES)
def test_wrong_types_in_config_segkit_give_one_line(tmp_path, foreign, uint8_stack, config, field):
    package = repack(foreign[0], tmp_path / "config.zip", lambda rdf: rdf.setdefault("config", {}).update(segkit=config))
    assert field in message(lambda: plan_package(package, channel=1))
    result = run("predict", uint8_stack, "-m", package, "-o", tmp_path / "p.tif", "--device", "cpu", "-q")
    assert_user_error(result, field)


@pytest.mark.parametrize("config, field", [
    *CONFIG_CASES,
    ({"test_tile": "abc"}, "config.segkit.test_tile: 'abc' is not a tile size"),
    ({"checkpoint": {"model_kwargs": {"base": 0}}}, "its record's model parameter base=0 is out of range"),
])
def test_wrong_types_in_the_record_of_a_segkit_package_give_one_line(tmp_path, own, uint8_stack, config, field):
    """The same values in a package segkit runs from its record (the watershed settings were not checked
    there), and a package's fix, not a checkpoint's ('train again')."""
    def edit(rdf):
        rdf["config"]["segkit"] = merged(rdf["config"]["segkit"], config)

    package = repack(own, tmp_path / "config.zip", edit)
    text = message(lambda: plan_package(package))
    assert field in text and "train again" not in text, text
    if isinstance(config, dict) and "checkpoint" in config:
        assert "the package is damaged or was edited: use another one" in text, text
    result = run("predict", uint8_stack, "-m", package, "-o", tmp_path / "p.tif", "--device", "cpu", "-q")
    assert_user_error(result, field)
    assert not (tmp_path / "p.tif").exists()


@pytest.mark.parametrize("which", ["foreign", "own"])
def test_a_huge_input_size_gives_one_line(tmp_path, foreign, own, uint8_stack, which):
    """min 1e12 (written as YAML's 1e+12): refused from the description, also where segkit runs the record."""
    def edit(rdf):
        for axis in rdf["inputs"][0]["axes"][2:]:
            axis["size"]["min"] = 1e12

    package = repack({"foreign": foreign[0], "own": own}[which], tmp_path / "huge.zip", edit)
    field = "inputs[0].axes[y].size: min 1000000000000"
    assert field in message(lambda: plan_package(package, channel=1 if which == "foreign" else None))
    assert_user_error(run("predict", uint8_stack, "-m", package, "-o", tmp_path / "p.tif", "--device", "cpu", "-q"),
                      field)


def test_a_tile_too_large_for_memory_is_refused_for_a_package(tmp_path, own, uint8_stack, monkeypatch):
    """--tile 100012 with a package run from its record: the memory check of checkpoints, not torch's failed
    allocation; the record's own tile (now the default) is checked the same way."""
    result = run("predict", uint8_stack, "-m", own, "-o", tmp_path / "p.tif", "--device", "cpu", "-q",
                 "--tile", 100012)
    assert_user_error(result, "tile 100012 needs at least", "use --tile")
    package = repack(own, tmp_path / "big.zip",
                     lambda rdf: rdf["config"]["segkit"]["checkpoint"]["inference"].update(tile=160012))
    assert_user_error(run("predict", uint8_stack, "-m", package, "-o", tmp_path / "p.tif", "--device", "cpu", "-q"),
                      "tile 160012 needs at least")
    assert not (tmp_path / "p.tif").exists()


@pytest.mark.parametrize("edit, field", [
    (lambda rdf: rdf["inputs"][0]["axes"][2]["size"].update(min="abc"),
     "its field inputs[0].axes[2].size.min is 'abc': Input should be a valid integer"),
    (lambda rdf: rdf["inputs"][0]["axes"][2]["size"].update(step=0),
     "its field inputs[0].axes[2].size.step is 0: Input should be greater than 0"),
    (lambda rdf: rdf["outputs"][0]["axes"][2].update(halo=-1), "its field outputs[0].axes[2].halo is -1"),
    (lambda rdf: rdf.pop("name"), "its field name is missing"),
    (lambda rdf: rdf["inputs"][0]["axes"][2].update(sise=rdf["inputs"][0]["axes"][2].pop("size")),
     "its field inputs[0].axes[2].sise is not a field of a model description"),
])
def test_an_invalid_description_names_the_field_and_its_value(tmp_path, foreign, uint8_stack, edit, field):
    """Not bioimageio.spec's Markdown table (its first cell named no field): the field as rdf.yaml writes it,
    the value and the fix."""
    package = repack(foreign[0], tmp_path / "invalid.zip", edit)
    text = message(lambda: plan_package(package, channel=1))
    assert "invalid.zip is not a valid bioimage.io package" in text and field in text, text
    assert "correct it in the package's rdf.yaml" in text and "bioimageio validate-format invalid.zip" in text
    assert "|" not in text and "❌" not in text
    assert_user_error(run("predict", uint8_stack, "-m", package, "-o", tmp_path / "p.tif", "--device", "cpu", "-q"),
                      field)


def test_a_file_the_package_names_but_does_not_hold_is_named(tmp_path, foreign, uint8_stack):
    """A relative `source:` naming a file missing from the package: one line naming the package, the field
    and the file (an architecture file used to end in bioimageio.core's 'expected str ... not NoneType')."""
    package = repack(foreign[0], tmp_path / "gone.zip", drop=("weights.onnx", "tiny_net.py"))
    assert_user_error(run("predict", uint8_stack, "-m", package, "-o", tmp_path / "p.tif", "--device", "cpu", "-q"),
                      "gone.zip names weights.onnx.source: weights.onnx but the package has no such file")
    text = message(lambda: load_package(package, weights="pytorch_state_dict", channel=1, device="cpu",
                                        trust_model_code=True))
    assert "gone.zip names weights.pytorch_state_dict.architecture.source: tiny_net.py but the package has no such " \
           "file" in text and "NoneType" not in text, text
