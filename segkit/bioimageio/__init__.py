"""bioimage.io model packages: segkit writes them (`write`, `segkit package`) and runs them (`read`).

A package is a zip holding `rdf.yaml` (model spec 0.5) and the files it names. `write` builds the
package of a segkit checkpoint, checked with bioimageio.spec and bioimageio.core; `read` turns a
2D package (segkit's or another tool's) into an engine for segkit's streaming pipeline. Neither
module imports torch until a model is built; both need the extra: pip install 'segkit-bio[bioimageio]'.

`inference_model` is importable from here because written packages name it
(`segkit.bioimageio.inference_model`) as their pytorch_state_dict architecture.
"""

from segkit.bioimageio.read import (
    PackageEngine,
    PackageModelError,
    PackagePlan,
    is_package,
    load_package,
    plan_package,
)
from segkit.bioimageio.write import (
    PackageError,
    PackageRecord,
    build_package,
    inference_model,
    package_checkpoint,
    validate_package,
)

__all__ = [
    "PackageEngine",
    "PackageError",
    "PackageModelError",
    "PackagePlan",
    "PackageRecord",
    "build_package",
    "inference_model",
    "is_package",
    "load_package",
    "package_checkpoint",
    "plan_package",
    "validate_package",
]
