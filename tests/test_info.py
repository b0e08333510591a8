"""`segkit info`: versions, devices and providers, for users checking their install and for bug reports."""

from __future__ import annotations

import json

from segkit.info import describe, format_info, package_versions
from tests.helpers import run


def test_info_names_versions_devices_and_providers():
    details = describe()
    torch_info = details["torch"]
    assert torch_info["installed"] and torch_info["auto_device"] in {"cpu", "cuda:0"}
    assert details["packages"]["torch"] == torch_info["version"].split("+")[0]
    assert details["onnxruntime"]["installed"] and "CPUExecutionProvider" in details["onnxruntime"]["providers"]
    text = format_info(details)
    assert text.splitlines()[0].startswith(f"segkit {details['segkit']} on Python")
    assert text.splitlines()[0].endswith("; pip name segkit-bio")  # `segkit` on PyPI is not ours
    assert "device auto -> " in text and "onnxruntime " in text and "providers CPUExecutionProvider" in text.replace(
        "TensorrtExecutionProvider, ", "").replace("CUDAExecutionProvider, ", "")


def test_info_leaves_out_what_is_not_installed():
    assert package_versions(("numpy", "surely-not-a-package-segkit")) == {"numpy": package_versions(("numpy",))["numpy"]}


def test_info_command_prints_lines_or_json():
    lines = run("info")
    assert lines.exit_code == 0 and "device auto -> " in lines.stdout
    as_json = run("info", "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["torch"]["installed"]
