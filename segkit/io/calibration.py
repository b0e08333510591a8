"""Physical pixel sizes (x, y, z and their unit) read from any input and carried to every output,
and what a segkit output holds.

Inputs state their calibration in several dialects: TIFF resolution tags (pixels per inch or
centimetre, or per the ImageJ `unit` of the description), ImageJ's `spacing` (z), OME-XML's
PhysicalSize{X,Y,Z} with their units, and OME-Zarr's multiscales scale with axis units. All of
them are read here into one `Calibration`, which the writers turn back into each format's own
words (ImageJ `unit`/`spacing`, OME-XML physical sizes, NGFF scale and units), so a stack keeps its
spacing from input to output whatever the formats on either side.

Every output segkit writes also records what it holds (`CONTENTS`): probabilities, classes,
labels (objects or instances) or intensities, so a reader (the napari plugin) opens labels as
labels. TIFF: the ImageJ description's `segkit_content` (OME-TIFF: the image's Description,
`segkit_content=...`); OME-Zarr: the group attribute `segkit.content`.

Only tifffile and the standard library are imported: zarr stores are read as their JSON files.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tifffile

#: What a segkit output holds; the key it is stored under.
CONTENTS = ("probabilities", "classes", "labels", "intensities")
CONTENT_KEY = "segkit_content"

#: Micrometres per unit, by NGFF (UDUNITS-2) name: the canonical names a Calibration holds.
_UNIT_UM = {
    "angstrom": 1e-4, "nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3, "centimeter": 1e4,
    "meter": 1e6, "inch": 25400.0,
}
#: Other spellings (ImageJ's, OME's symbols, British), lower case, micro sign spelled 'u'.
_UNIT_ALIASES = {
    **dict.fromkeys(("um", "micron", "microns", "micrometers", "micrometre", "micrometres"), "micrometer"),
    **dict.fromkeys(("nm", "nanometers", "nanometre", "nanometres"), "nanometer"),
    **dict.fromkeys(("mm", "millimeters", "millimetre", "millimetres"), "millimeter"),
    **dict.fromkeys(("cm", "centimeters", "centimetre", "centimetres"), "centimeter"),
    **dict.fromkeys(("m", "meters", "metre", "metres"), "meter"),
    **dict.fromkeys(("in", "inches"), "inch"),
    **dict.fromkeys(("a", "\u00c5", "\u212b", "angstroms", "angstrom"), "angstrom"),
}
#: How ImageJ and OME-XML spell each canonical unit.
_IMAGEJ_UNITS = {"micrometer": "micron", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm",
                 "meter": "m", "inch": "inch", "angstrom": "A"}
_OME_UNITS = {"micrometer": "\u00b5m", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm",
              "meter": "m", "inch": "in", "angstrom": "\u00c5"}
#: Micrometres per TIFF ResolutionUnit (2 inch, 3 centimetre; 4 mm and 5 um are tifffile's extensions).
_RESOLUTION_UNIT_UM = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}


def unit_name(text: Any) -> str | None:
    """The canonical (NGFF) name of a length unit in any common spelling ('um', 'micron', 'µm',
    ImageJ's escaped '\\u00B5m', 'nm', 'Å', 'micrometer', ...); None for 'pixel' and other non-lengths."""
    if text is None:
        return None
    name = str(text).strip()
    if "\\u" in name:  # ImageJ escapes non-ASCII in its description: '\u00B5m'
        try:
            name = name.encode("ascii", "backslashreplace").decode("unicode_escape")
        except UnicodeError:
            pass
    name = name.replace("\u00b5", "u").replace("\u03bc", "u")
    if name in ("\u00c5", "\u212b"):
        return "angstrom"
    name = name.lower()
    return name if name in _UNIT_UM else _UNIT_ALIASES.get(name)


def unit_micrometres(text: Any) -> float | None:
    """Micrometres per unit of a length unit in any spelling `unit_name` knows; None otherwise."""
    name = unit_name(text)
    return _UNIT_UM[name] if name else None


def _size(value: Any) -> float | None:
    """A pixel size: a finite positive float, else None."""
    try:
        size = float(value)
    except (TypeError, ValueError):
        return None
    return float(f"{size:.12g}") if math.isfinite(size) and size > 0 else None


@dataclass(frozen=True)
class Calibration:
    """The physical size of a pixel along x, y and z, in one length unit.

    Attributes
    ----------
    x, y : float or None
        Pixel width and height in `unit`; None when the input does not say.
    z : float or None
        Slice spacing in `unit`; None when the input does not say (a 2D image, or a stack without it).
    unit : str
        NGFF / UDUNITS-2 name: 'micrometer', 'nanometer', 'millimeter', 'centimeter', 'meter',
        'inch' or 'angstrom'.
    """

    x: float | None = None
    y: float | None = None
    z: float | None = None
    unit: str = "micrometer"

    def __post_init__(self) -> None:
        if self.unit not in _UNIT_UM:
            raise ValueError(f"unit {self.unit!r}: expected one of {', '.join(_UNIT_UM)}")

    @property
    def is_empty(self) -> bool:
        """True when no size is known."""
        return self.x is None and self.y is None and self.z is None

    @property
    def pixel_size_um(self) -> float | None:
        """Micrometres per pixel in the plane (x; the mean of x and y where they differ by more than 1 %)."""
        if self.x is None or self.y is None:
            return None
        per_unit = _UNIT_UM[self.unit]
        size_x, size_y = self.x * per_unit, self.y * per_unit
        size = size_x if abs(size_x - size_y) <= 0.01 * max(size_x, size_y) else (size_x + size_y) / 2
        return float(f"{size:.12g}")

    @property
    def imagej_unit(self) -> str:
        """The unit as ImageJ writes it ('micron', 'nm', ...)."""
        return _IMAGEJ_UNITS[self.unit]

    @property
    def ome_unit(self) -> str:
        """The unit as OME-XML writes it ('µm', 'nm', ...)."""
        return _OME_UNITS[self.unit]

    def in_unit(self, unit: str) -> "Calibration":
        """The same sizes expressed in another unit (any spelling `unit_name` knows).

        Parameters
        ----------
        unit : str
            E.g. 'micrometer', 'um', 'nm'.

        Returns
        -------
        Calibration
            Sizes converted (12 significant digits), unknown sizes left None.

        Raises
        ------
        ValueError
            When `unit` is not a length unit.
        """
        name = unit_name(unit)
        if name is None:
            raise ValueError(f"unit {unit!r} is not a length unit")
        factor = _UNIT_UM[self.unit] / _UNIT_UM[name]
        x, y, z = (_size(size * factor) if size is not None else None for size in (self.x, self.y, self.z))
        return Calibration(x, y, z, name)

    def scale(self, axes: str) -> tuple[float, ...]:
        """One value per axis of `axes` ('ZYX', 'CYX', 'ZCYX', ...): the pixel size for X, Y, Z where
        known, 1.0 for channel axes and unknown sizes (what napari's `scale` and NGFF's scale want)."""
        sizes = {"X": self.x, "Y": self.y, "Z": self.z}
        return tuple(float(sizes.get(axis.upper()) or 1.0) for axis in axes)


def calibration_from_resolution(x_per_unit: float, y_per_unit: float, resolution_unit: int,
                                named_unit: Any = None, z_spacing: Any = None) -> Calibration | None:
    """A Calibration from TIFF resolution tags (pixels per unit).

    Parameters
    ----------
    x_per_unit, y_per_unit : float
        XResolution and YResolution.
    resolution_unit : int
        ResolutionUnit: 1 none, 2 inch, 3 centimetre (4 mm, 5 um: tifffile's extensions).
    named_unit : str, optional
        The unit a description names (ImageJ's `unit`); it wins over ResolutionUnit.
    z_spacing : float, optional
        ImageJ's `spacing`, in `named_unit`.

    Returns
    -------
    Calibration or None
        None where the tags hold no calibration: no known unit, or a TIFF default (1 pixel per unit
        without a named unit, 72 dpi).
    """
    x_size = _size(1.0 / x_per_unit) if _size(x_per_unit) else None
    y_size = _size(1.0 / y_per_unit) if _size(y_per_unit) else None
    unit = unit_name(named_unit)
    if unit is not None:
        z_size = _size(z_spacing)
        calibration = Calibration(x_size, y_size, z_size, unit)
        return None if calibration.is_empty else calibration
    per_unit = _RESOLUTION_UNIT_UM.get(int(resolution_unit))
    if per_unit is None or x_size is None or y_size is None:
        return None
    if abs(x_per_unit - 1) < 1e-9 and abs(y_per_unit - 1) < 1e-9:
        return None
    if per_unit == _RESOLUTION_UNIT_UM[2] and abs(x_per_unit - 72) < 1e-6 and abs(y_per_unit - 72) < 1e-6:
        return None  # a screen default, not a calibration
    return Calibration(_size(x_size * per_unit), _size(y_size * per_unit), None, "micrometer")


def tiff_calibration(tif: tifffile.TiffFile) -> Calibration | None:
    """The calibration of an open TIFF: OME-XML physical sizes, else the resolution tags with the
    ImageJ (or tifffile JSON) unit and ImageJ's z spacing; None where the file holds none."""
    if not tif.pages:
        return None
    if tif.is_ome:
        calibration = _ome_calibration(tif.ome_metadata)
        if calibration is not None:
            return calibration
    page = tif.pages.first
    if "XResolution" not in page.tags or "YResolution" not in page.tags:
        return None
    metadata = description_metadata(tif)
    try:
        x, y = page.resolution
        return calibration_from_resolution(float(x), float(y), int(page.resolutionunit),
                                           metadata.get("unit"), metadata.get("spacing"))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None


def description_metadata(tif: tifffile.TiffFile) -> dict[str, Any]:
    """The key/value metadata of ImageJ's description or of tifffile's JSON one; {} when none."""
    try:
        if tif.is_imagej:
            metadata = tif.imagej_metadata
        elif tif.is_shaped:
            metadata = (tif.shaped_metadata or (None,))[0]
        else:
            return {}
    except Exception:  # a damaged description is no calibration, not a failure to read the pixels
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _ome_calibration(xml: str | None) -> Calibration | None:
    """PhysicalSize{X,Y,Z} of the first image of an OME-XML document, in one unit."""
    if not xml:
        return None
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    pixels = next((element for element in root.iter() if element.tag.endswith("}Pixels") or element.tag == "Pixels"),
                  None)
    if pixels is None:
        return None
    sizes_um: dict[str, float | None] = {}
    for axis in "XYZ":
        size = _size(pixels.get(f"PhysicalSize{axis}"))
        per_unit = unit_micrometres(pixels.get(f"PhysicalSize{axis}Unit", "\u00b5m"))  # OME's default is µm
        sizes_um[axis] = size * per_unit if size is not None and per_unit is not None else None
    if all(value is None for value in sizes_um.values()):
        return None
    x_unit = unit_name(pixels.get("PhysicalSizeXUnit", "\u00b5m")) or "micrometer"
    per_unit = _UNIT_UM[x_unit]
    return Calibration(*(_size(sizes_um[axis] / per_unit) if sizes_um[axis] is not None else None
                         for axis in "XYZ"), x_unit)


def zarr_attributes(store: str | Path) -> dict[str, Any]:
    """The attributes of a zarr group (format 2 `.zattrs` or format 3 `zarr.json`); {} when none."""
    path = Path(store)
    try:
        if (path / "zarr.json").is_file():
            attributes = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        elif (path / ".zattrs").is_file():
            attributes = json.loads((path / ".zattrs").read_text())
        else:
            return {}
    except (OSError, ValueError, AttributeError):
        return {}
    return attributes if isinstance(attributes, dict) else {}


def ngff_multiscales(attributes: dict[str, Any]) -> Any:
    """The NGFF `multiscales` list of a group's attributes: at the top level (0.4) or under 'ome' (0.5);
    None when the group has none."""
    return attributes.get("multiscales") or (attributes.get("ome") or {}).get("multiscales")


def zarr_calibration(store: str | Path) -> Calibration | None:
    """The calibration of an OME-Zarr group: level 0's scale (times any multiscales-wide scale) per
    spatial axis, with the axes' units (NGFF 0.4 at the top level, 0.5 under 'ome'); None when none."""
    attributes = zarr_attributes(store)
    multiscales = ngff_multiscales(attributes)
    try:
        first = multiscales[0]
        axes = [axis if isinstance(axis, dict) else {"name": str(axis)} for axis in first["axes"]]
        scale = [1.0] * len(axes)
        for transforms in (first.get("coordinateTransformations") or [],
                           first["datasets"][0].get("coordinateTransformations") or []):
            for transform in transforms:
                if transform.get("type") == "scale":
                    scale = [a * float(b) for a, b in zip(scale, transform["scale"])]
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        return None
    sizes: dict[str, float | None] = {}
    units = set()
    for axis, value in zip(axes, scale):
        name = str(axis.get("name", "")).upper()
        unit = unit_name(axis.get("unit"))
        if name in ("X", "Y", "Z") and unit is not None:
            sizes[name] = _size(value)
            units.add(unit)
    if not sizes or len(units) != 1:  # no unit said, or mixed units (which segkit does not convert)
        return None
    return Calibration(sizes.get("X"), sizes.get("Y"), sizes.get("Z"), units.pop())


def read_calibration(path: str | Path) -> Calibration | None:
    """The calibration of a TIFF file or an OME-Zarr store (a folder); None when it holds none or
    cannot be read (calibration is never a reason to fail)."""
    path = Path(path)
    if path.is_dir():
        return zarr_calibration(path)
    try:
        with tifffile.TiffFile(path) as tif:
            return tiff_calibration(tif)
    except Exception:  # unreadable files are reported by the readers of their pixels
        return None


def read_content(path: str | Path) -> str | None:
    """What a segkit output holds (one of `CONTENTS`), from its metadata; None for files segkit did
    not write (or wrote before it recorded this)."""
    path = Path(path)
    if path.is_dir():
        content = (zarr_attributes(path).get("segkit") or {}).get("content")
        return content if content in CONTENTS else None
    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome:
                content = _ome_description_content(tif.ome_metadata)
            else:
                content = description_metadata(tif).get(CONTENT_KEY)
    except Exception:
        return None
    return content if content in CONTENTS else None


def _ome_description_content(xml: str | None) -> str | None:
    """`segkit_content=...` in the first image's Description of an OME-XML document."""
    try:
        root = ElementTree.fromstring(xml or "")
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("Description") and element.text:
            for line in element.text.splitlines():
                key, _, value = line.partition("=")
                if key.strip() == CONTENT_KEY:
                    return value.strip()
    return None
