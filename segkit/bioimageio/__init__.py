"""bioimage.io model packages: segkit writes them (`write`, `segkit package`) and runs them (`read`).

A package is a zip holding `rdf.yaml` (model spec 0.5) and the files it names. `write` builds the
package of a segkit checkpoint, checked with bioimageio.spec and bioimageio.core; `read` turns a
2D package (segkit's or another tool's) into an engine for segkit's streaming pipeline. Neither
module imports torch until a model is built; both need the extra: pip install 'segkit-bio[bioimageio]'.

Packages ship their pytorch_state_dict architecture as `arch.py` (`source`: segkit's model code
with no segkit import; `head.PackagedModel` is the module packaged). `inference_model` stays
importable from here because packages written by earlier segkit versions name it.
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
    package_geometry,
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
    "package_geometry",
    "plan_package",
    "validate_package",
]
