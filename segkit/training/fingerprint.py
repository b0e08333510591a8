"""The fingerprint of a labelled data folder: what `segkit init` measures before it writes a recipe.

As nnU-Net's dataset fingerprint: image count and sizes, dtype, channels, intensity percentiles,
pixel sizes, and from the labels their kind (membrane / semantic classes / object ids), the class
frequencies and, for objects, their size (equivalent diameter, as cellpose's diameter) and how
often they touch. The statistics are pure functions over arrays; `find_layout` and `read_samples`
find and read the files (at most MAX_SAMPLES images, chosen evenly, so large sets take seconds).

Two layouts: DATA/images/NAME.tif + DATA/labels/NAME.tif (optional train.txt, val.txt, test.txt),
or one image stack and one label stack in DATA (ISBI 2012's train-volume.tif + train-labels.tif).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segkit.errors import InputError
from segkit.io.tiff import open_stack
from segkit.training.datasets import _stem
from segkit.words import counted

#: Images (or planes) read for the statistics; the rest are only opened (sizes, pixel sizes).
MAX_SAMPLES = 50
#: Pixels per image used for the intensity percentiles (a regular subsample of larger images).
PERCENTILE_PIXELS = 1 << 18
#: Label images whose distance transforms decide whether value 0 is thin (membranes).
THIN_SAMPLES = 10
#: Share of (image, value) regions that are one connected piece above which labels read as object ids.
INSTANCE_SHARE = 0.75
#: Semantic labels have few classes; more values than this that are not one piece each are not labels.
MAX_CLASSES = 32
SPLIT_FILES = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}


# -- files -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    """One image file and its label file, from their headers: planes, plane size, channels, dtype,
    pixel size (micrometres, None when uncalibrated)."""

    image: str
    labels: str
    planes: int
    shape: tuple[int, int]
    channels: int
    dtype: str
    pixel_size: float | None

    @property
    def name(self) -> str:
        return _stem(self.image)


@dataclass(frozen=True)
class DataLayout:
    """Where a data folder's images and labels are. form: 'folders' (images/ + labels/, paired by
    name) or 'stack' (one image stack and its label stack); raw and labels relative to root."""

    root: Path
    form: str
    raw: str
    labels: str
    pairs: tuple[Pair, ...]
    split_files: dict[str, Path] = field(default_factory=dict)

    @property
    def planes(self) -> int:
        return sum(p.planes for p in self.pairs)

    def describe(self) -> str:
        if self.form == "stack":
            pair = self.pairs[0]
            return f"{self.raw} + {self.labels}, one stack of {counted(pair.planes, 'plane')}"
        splits = f"; split files {', '.join(p.name for p in self.split_files.values())}" if self.split_files else ""
        planes = f" ({counted(self.planes, 'plane')})" if self.planes != len(self.pairs) else ""
        return f"{self.raw}/ + {self.labels}/, {counted(len(self.pairs), 'image')}{planes}{splits}"


def _tiffs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".tif", ".tiff"))


def _header(path: Path | str, *, labels: bool = False) -> tuple[int, tuple[int, int], int, str, float | None]:
    """(planes, (H, W), channels, dtype, pixel size) of a TIFF, from its header (no pixels read)."""
    with open_stack(path, labels=labels, check_memory=False) as stack:
        if labels and stack.dtype.kind == "f":
            raise InputError(f"{path}: labels are {stack.dtype}; labels must be integers (classes or object ids): "
                             "save them as uint8/uint16/uint32")
        return len(stack), tuple(stack.shape[1:]), stack.channels, str(stack.dtype), stack.pixel_size


def _pair(image: Path, labels: Path) -> Pair:
    planes, shape, channels, dtype, pixel_size = _header(image)
    label_planes, label_shape, _, _, _ = _header(labels, labels=True)
    if label_shape != shape:
        raise InputError(f"{image} is {shape[0]} x {shape[1]} px but its labels {labels} are {label_shape[0]} x "
                         f"{label_shape[1]}; pair each image with labels of the same size")
    if label_planes != planes and label_planes != 1:
        raise InputError(f"{labels} has {label_planes} planes but {image} has {planes}; pair each image with "
                         "labels of the same size")
    return Pair(str(image), str(labels), planes, shape, channels, dtype, pixel_size)


def find_layout(root: str | Path, *, images: str | None = None, labels: str | None = None,
                settings: tuple[str, str] = ("images", "labels")) -> DataLayout:
    """The images and labels of a data folder (see the module's two layouts); `images` and `labels`
    name them inside `root` (folders, or one stack file each) instead of finding them; `settings`
    are their names in messages."""
    pick = f"{settings[0]}=NAME and {settings[1]}=NAME"
    root = Path(root).expanduser()
    if not root.exists():
        raise InputError(f"data folder {root} does not exist; pass the folder that holds images/ and labels/ "
                         "(or an image stack and its label stack)")
    if not root.is_dir():
        raise InputError(f"{root} is a file, not a folder; pass the folder that holds images/ and labels/ "
                         "(or an image stack and its label stack)")
    root = root.resolve()
    if (images is None) != (labels is None):
        raise InputError(f"give both {pick} (the image and label folders or stacks in the data folder {root}), or "
                         "neither to find them")
    if images is not None and labels is not None:
        raw_path, label_path = root / images, root / labels
        for what, path in zip(settings, (raw_path, label_path)):
            if not path.exists():
                raise InputError(f"{what}={path.name}: {path} does not exist; name a folder or TIFF in {root}")
        if raw_path.is_dir() != label_path.is_dir():
            raise InputError(f"{settings[0]}={images} and {settings[1]}={labels} must both be folders or both be "
                             "stack files")
        if raw_path.is_dir():
            return _folder_layout(root, raw_path, label_path)
        return DataLayout(root, "stack", images, labels, (_pair(raw_path, label_path),))
    if (root / "images").is_dir():
        if not (root / "labels").is_dir():
            raise InputError(f"{root / 'images'} holds the images but there is no {root / 'labels'} folder; put each "
                             "image's labels in labels/ under the same file name")
        return _folder_layout(root, root / "images", root / "labels")
    return _stack_layout(root, pick)


def _folder_layout(root: Path, images: Path, labels: Path) -> DataLayout:
    image_files = _tiffs(images)
    if not image_files:
        raise InputError(f"folder {images} holds no .tif/.tiff images; put the images there as TIFF files")
    label_files = {_stem(str(p)): p for p in _tiffs(labels)}
    pairs = []
    for image in image_files:
        label = label_files.get(_stem(str(image)))
        if label is None:
            raise InputError(f"no label image for {image.name} in {labels}; each image needs a label file of the same "
                             "name")
        pairs.append(_pair(image, label))
    splits = {split: root / name for split, name in SPLIT_FILES.items() if (root / name).is_file()}
    return DataLayout(root, "folders", images.name if images.parent == root else str(images.relative_to(root)),
                      labels.name if labels.parent == root else str(labels.relative_to(root)), tuple(pairs), splits)


def _common_prefix(a: str, b: str) -> int:
    count = 0
    for x, y in zip(a.lower(), b.lower()):
        if x != y:
            break
        count += 1
    return count


def _stack_layout(root: Path, pick: str) -> DataLayout:
    files = _tiffs(root)
    if not files:
        raise InputError(f"folder {root} holds no TIFF images; expected images/ and labels/ folders of TIFFs (see "
                         "'Train on your own data' in the README), or an image stack and its label stack such as "
                         "train-volume.tif + train-labels.tif")
    label_files = [p for p in files if "label" in p.name.lower()]
    if not label_files:
        raise InputError(f"{root} holds TIFFs ({', '.join(p.name for p in files[:3])}"
                         f"{' ...' if len(files) > 3 else ''}) but no labels: name the label stack with 'label' in it "
                         f"(e.g. train-labels.tif), use images/ + labels/ folders, or pass {pick}")
    if len(label_files) > 1:
        raise InputError(f"{root} holds several label files ({', '.join(p.name for p in label_files[:4])}); pass "
                         f"{pick} to choose one pair, or use images/ + labels/ folders")
    label = label_files[0]
    label_planes, label_shape, _, _, _ = _header(label, labels=True)
    candidates = []
    for image in files:
        if image == label:
            continue
        planes, shape, *_ = _header(image)
        if shape == label_shape and planes == label_planes:
            candidates.append(image)
    if not candidates:
        raise InputError(f"no image stack in {root} has the size of the labels {label.name} ({label_planes} planes of "
                         f"{label_shape[0]} x {label_shape[1]} px); pair each image with labels of the same size")
    image = max(candidates, key=lambda p: (_common_prefix(p.name, label.name), -candidates.index(p)))
    return DataLayout(root, "stack", image.name, label.name, (_pair(image, label),))


@dataclass(frozen=True)
class Sample:
    """One image read for the statistics: (C, H, W) as stored, its (H, W) labels, its pixel size."""

    image: np.ndarray
    labels: np.ndarray
    pixel_size: float | None
    source: str


def sample_indices(count: int, limit: int = MAX_SAMPLES) -> list[int]:
    """`limit` indices spread evenly over range(count) (all of them when count <= limit)."""
    if count <= limit:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, limit)})


def read_samples(layout: DataLayout, limit: int = MAX_SAMPLES) -> list[Sample]:
    """At most `limit` planes of the layout, spread evenly over its images and planes (deterministic)."""
    planes = [(pair, z) for pair in layout.pairs for z in range(pair.planes)]
    chosen: dict[Pair, list[int]] = {}
    for index in sample_indices(len(planes), limit):
        pair, z = planes[index]
        chosen.setdefault(pair, []).append(z)
    samples = []
    for pair, indices in chosen.items():
        with open_stack(pair.image) as images, open_stack(pair.labels, labels=True) as labels:
            for z in indices:
                image = images.plane(z)
                label = labels.plane(z if len(labels) > 1 else 0)
                where = pair.image if pair.planes == 1 else f"{pair.image} plane {z}"
                samples.append(Sample(image[None] if image.ndim == 2 else image, label, pair.pixel_size, where))
    return samples


# -- statistics over arrays -----------------------------------------------------------------

def intensity_percentiles(images: Sequence[np.ndarray], quantiles: Sequence[float] = (0.5, 50, 99.5),
                          pixels: int = PERCENTILE_PIXELS) -> tuple[tuple[float, ...], ...]:
    """Per channel, the percentiles of all images' values together ((C, H, W) images; each image
    subsampled on a regular grid to about `pixels` values)."""
    channels = images[0].shape[0]
    result = []
    for c in range(channels):
        values = []
        for image in images:
            plane = image[c]
            step = max(1, int(np.sqrt(plane.size / pixels)))
            values.append(plane[::step, ::step].ravel())
        result.append(tuple(float(v) for v in np.percentile(np.concatenate(values), quantiles)))
    return tuple(result)


def value_counts(labels: Sequence[np.ndarray]) -> dict[int, int]:
    """Pixel count of every label value over all label images."""
    counts: dict[int, int] = {}
    for image in labels:
        values, numbers = np.unique(image, return_counts=True)
        for value, number in zip(values.tolist(), numbers.tolist()):
            counts[value] = counts.get(value, 0) + number
    return counts


def pieces_per_value(labels: np.ndarray) -> dict[int, int]:
    """How many connected pieces (8-connectivity) the region of each non-zero value has."""
    from skimage.measure import label as connected

    pieces, count = connected(labels, background=0, connectivity=2, return_num=True)
    if count == 0:
        return {}
    value_of = np.zeros(count + 1, dtype=np.int64)
    value_of[pieces.ravel()] = labels.ravel()
    values, numbers = np.unique(value_of[1:], return_counts=True)
    return dict(zip(values.tolist(), numbers.tolist()))


def zero_thickness(labels: Sequence[np.ndarray]) -> tuple[float, float]:
    """Mean distance (px) of value-0 pixels to the nearest non-zero pixel, and of non-zero pixels to
    the nearest 0: thin membranes between large cells give a small first and a large second number."""
    from scipy import ndimage

    zero_sum = zero_count = other_sum = other_count = 0.0
    for image in labels:
        zero = image == 0
        if zero.all() or not zero.any():
            continue
        zero_sum += float(ndimage.distance_transform_edt(zero)[zero].sum())
        other_sum += float(ndimage.distance_transform_edt(~zero)[~zero].sum())
        zero_count += float(zero.sum())
        other_count += float((~zero).sum())
    if not zero_count or not other_count:
        return 0.0, 0.0
    return zero_sum / zero_count, other_sum / other_count


def object_diameters(labels: np.ndarray, factor: float = 1.0) -> np.ndarray:
    """Equivalent diameter sqrt(4 A / pi) of every object id (> 0) of a label image, times `factor`
    (the resize an image gets, e.g. to a common pixel size)."""
    areas = np.bincount(labels.ravel().astype(np.int64))[1:]
    areas = areas[areas > 0]
    return np.sqrt(4.0 * areas / np.pi) * factor


def touching_objects(labels: np.ndarray) -> tuple[int, int]:
    """(objects that touch another object, all objects): touching = a pixel 8-adjacent to a pixel of
    another non-zero id."""
    labels = labels.astype(np.int64, copy=False)
    touching: set[int] = set()
    pairs = ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :]),
             (labels[:-1, :-1], labels[1:, 1:]), (labels[:-1, 1:], labels[1:, :-1]))
    for a, b in pairs:
        where = (a > 0) & (b > 0) & (a != b)
        if where.any():
            touching.update(np.unique(a[where]).tolist())
            touching.update(np.unique(b[where]).tolist())
    total = int(np.count_nonzero(np.bincount(labels.ravel())[1:]))
    return len(touching), total


@dataclass(frozen=True)
class LabelSummary:
    """What the label images hold, for the kind guess: pixel count per value, the share of (image,
    non-zero value) regions that are one connected piece, and value 0's thickness (zero_thickness)."""

    counts: dict[int, int]
    single_share: float
    regions: int
    zero_distance: float
    other_distance: float

    @property
    def values(self) -> list[int]:
        return sorted(self.counts)

    @property
    def zero_is_thin(self) -> bool:
        """Value 0 forms thin lines (membranes) between larger regions: its pixels lie on average at
        most a third as far from the other regions as theirs from it, and cover under half the image."""
        total = sum(self.counts.values())
        return (0 in self.counts and len(self.counts) > 1 and self.counts[0] < 0.5 * total
                and 0 < self.zero_distance * 3 <= self.other_distance)


def summarize_labels(labels: Sequence[np.ndarray]) -> LabelSummary:
    counts = value_counts(labels)
    single = regions = 0
    for image in labels:
        pieces = pieces_per_value(image)
        regions += len(pieces)
        single += sum(1 for n in pieces.values() if n == 1)
    zero, other = zero_thickness([labels[i] for i in sample_indices(len(labels), THIN_SAMPLES)]) \
        if 0 in counts and len(counts) > 1 else (0.0, 0.0)
    return LabelSummary(counts, single / regions if regions else 0.0, regions, zero, other)


def _values_text(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:6])
    return shown + (f" ... ({len(values)} values)" if len(values) > 6 else "")


def guess_kind(summary: LabelSummary) -> tuple[str, str]:
    """(label kind, the reason in words) decided over all label images together:
    two values with a thin value 0 between larger regions > 0: membrane (ISBI 2012);
    values whose regions are mostly one connected piece per image: object ids (instances);
    otherwise a few values whose regions are in many pieces: semantic classes."""
    values = summary.values
    if len(values) < 2:
        raise InputError(f"the labels hold only the value {values[0] if values else '?'} everywhere, so there is "
                         "nothing to learn; check that the label images are the right files")
    if len(values) == 2 and values[0] == 0 and summary.zero_is_thin:
        return "membrane", (f"two values, 0 and {values[1]}, with 0 thin lines between larger regions "
                            f"({summary.zero_distance:.1f} px vs {summary.other_distance:.1f} px from the other value "
                            "on average): membranes 0 between cells > 0")
    if summary.single_share >= INSTANCE_SHARE:
        return "instances", (f"{100 * summary.single_share:.0f} % of the {summary.regions} regions of one value in an "
                             "image are one connected piece: object ids (0 = background)")
    if len(values) > MAX_CLASSES:
        raise InputError(f"the labels hold {len(values)} values whose regions are mostly split into pieces "
                         f"({100 * summary.single_share:.0f} % one piece), so they are neither classes nor object ids; "
                         "are the label files images? Labels hold classes 0..K-1 or one id per object")
    return "semantic", (f"{len(values)} values ({_values_text(values)}); {100 * (1 - summary.single_share):.0f} % of "
                        f"the {summary.regions} regions of one value in an image are in several pieces: classes")


def kind_problem(kind: str, summary: LabelSummary) -> str | None:
    """Why the labels cannot be of `kind` (the user's choice or the guess), in words that follow
    "labels_kind KIND needs ...", or None when they can."""
    values = summary.values
    if kind == "semantic":
        if summary.single_share >= INSTANCE_SHARE and len(values) > MAX_CLASSES:
            return (f"classes 0..K-1, but the labels hold {len(values)} values, each mostly one connected piece: "
                    "object ids, not classes; use kind=instances")
        if values[0] < 0 or values[-1] >= MAX_CLASSES:
            if len(values) == 2 and summary.zero_is_thin:
                hint = ("; with 0 thin lines between regions they look like membrane labels (0 = membrane, > 0 = cell): "
                        "use kind=membrane")
            else:
                hint = f"; relabel them as 0..K-1 (e.g. {values[-1]} -> {len(values) - 1})"
            return (f"classes 0..K-1 (K up to {MAX_CLASSES}), but the labels hold the values {_values_text(values)}"
                    + hint)
    if kind == "instances" and summary.single_share < 0.5:
        return (f"one id per object, but {100 * (1 - summary.single_share):.0f} % of the regions of one value in an "
                f"image are split into several pieces (values {_values_text(values)}): classes, not object ids; use "
                "kind=semantic (or membrane), or give each object its own id (e.g. skimage.measure.label)")
    if kind == "membrane":
        if 0 not in summary.counts:
            return f"0 = membrane and > 0 = cell, but the labels have no 0 (values {_values_text(values)})"
        if not summary.zero_is_thin:
            share = summary.counts[0] / sum(summary.counts.values())
            return (f"thin membranes 0 between cells > 0, but value 0 covers {100 * share:.0f} % of the pixels in wide "
                    f"regions (values {_values_text(values)}); use kind=semantic or kind=instances")
    return None


# -- the fingerprint -------------------------------------------------------------------------

@dataclass(frozen=True)
class Fingerprint:
    """What a labelled data folder holds; `lines()` says it in words."""

    source: str
    form: str  # folders | stack (DataLayout.form)
    layout: str
    images: int
    sampled: int
    heights: tuple[int, int, int]  # min, median, max
    widths: tuple[int, int, int]
    dtype: str
    channels: int
    percentiles: tuple[tuple[float, ...], ...]  # per channel: p0.5, p50, p99.5
    pixel_sizes: tuple[float | None, ...]  # per image (all images, from the headers)
    kind: str
    kind_reason: str
    class_fractions: tuple[tuple[str, float], ...]
    values: tuple[int, ...]
    objects: int = 0
    diameters: tuple[float, float, float] | None = None  # p10, median, p90 px, at `pixel_size` when set
    touching: float | None = None

    @property
    def dtype_max(self) -> float | None:
        kind = np.dtype(self.dtype).kind if "," not in self.dtype else "mixed"
        return float(np.iinfo(np.dtype(self.dtype)).max) if kind in "ui" else None

    @property
    def pixel_size_varies(self) -> bool:
        known = [p for p in self.pixel_sizes if p is not None]
        return bool(known) and max(known) > min(known) * 1.01

    @property
    def pixel_size(self) -> float | None:
        """The median pixel size (micrometres) of the images that carry one."""
        known = [p for p in self.pixel_sizes if p is not None]
        return float(np.median(known)) if known else None

    @property
    def uncalibrated(self) -> int:
        return sum(p is None for p in self.pixel_sizes)

    @property
    def common_pixel_size(self) -> float | None:
        """The pixel size every image is rescaled to (the median) when sizes differ between images and
        all images carry one; None when no rescaling is needed or possible."""
        if self.pixel_size_varies and not self.uncalibrated:
            return float(f"{self.pixel_size:.3g}")
        return None

    def lines(self) -> list[str]:
        """The fingerprint in words, one fact per line."""
        sampled = f"; statistics from {self.sampled} of them" if self.sampled < self.images else ""
        what = "planes" if self.form == "stack" else "images"
        lines = [f"data: {self.source} ({self.layout})",
                 f"{what}: {self.images}{sampled}",
                 f"size (min / median / max): height {' / '.join(map(str, self.heights))}, width "
                 f"{' / '.join(map(str, self.widths))} px",
                 f"dtype: {self.dtype}, {counted(self.channels, 'channel')}"]
        for c, (low, mid, high) in enumerate(self.percentiles):
            channel = f" channel {c}" if self.channels > 1 else ""
            span = f" (of 0-{self.dtype_max:g})" if self.dtype_max is not None else ""
            lines.append(f"intensity{channel} p0.5 / p50 / p99.5: {low:g} / {mid:g} / {high:g}{span}")
        known = [p for p in self.pixel_sizes if p is not None]
        if not known:
            lines.append("pixel size: none in the files")
        elif self.pixel_size_varies:
            missing = f"; none stored in {counted(self.uncalibrated, 'image')}" if self.uncalibrated else ""
            lines.append(f"pixel size: {min(known):.3g}-{max(known):.3g} um, median {self.pixel_size:.3g} um "
                         f"(differs between images{missing})")
        else:
            missing = f" (none stored in {counted(self.uncalibrated, 'image')})" if self.uncalibrated else ""
            lines.append(f"pixel size: {known[0]:.3g} um{missing}")
        lines.append(f"labels: {self.kind} ({self.kind_reason})")
        lines.append("class fractions: " + ", ".join(f"{name} {fraction:.3f}" for name, fraction in self.class_fractions))
        if self.diameters is not None:
            at = f" at {self.common_pixel_size:g} um/px" if self.common_pixel_size else ""
            lines.append(f"objects: {self.objects} in {counted(self.sampled, 'image')}; equivalent diameter p10 / median / p90: "
                         f"{' / '.join(f'{d:.1f}' for d in self.diameters)} px{at}; "
                         f"{100 * (self.touching or 0):.0f} % touch another object")
        return lines

    def text(self) -> str:
        return "\n".join(self.lines())


def class_fractions(kind: str, counts: dict[int, int]) -> tuple[tuple[str, float], ...]:
    """Share of the pixels per class: membrane (0) / cell; each semantic value; background / objects."""
    total = sum(counts.values()) or 1
    zero = counts.get(0, 0) / total
    if kind == "membrane":
        return (("membrane (0)", zero), ("cell (> 0)", 1 - zero))
    if kind == "instances":
        return (("background (0)", zero), ("objects (> 0)", 1 - zero))
    return tuple((f"class {value}", number / total) for value, number in sorted(counts.items()))


def fingerprint(layout: DataLayout, samples: Sequence[Sample], *, kind: str | None = None,
                kind_setting: str = "kind") -> Fingerprint:
    """The fingerprint of `layout` from its headers and the `samples` read from it; `kind` forces the
    label kind (InputError when the labels contradict it, naming the setting `kind_setting`), else it
    is guessed."""
    samples = list(samples)
    summary = summarize_labels([s.labels for s in samples])
    if len(summary.counts) < 2:
        samples.append(_another_value(layout, summary))
        summary = summarize_labels([s.labels for s in samples])
    if kind is not None:
        problem = kind_problem(kind, summary)
        if problem is not None:
            raise InputError(f"{kind_setting}={kind} needs {problem.replace('kind=', kind_setting + '=')}")
        try:
            guessed, reason = guess_kind(summary)
        except InputError:
            guessed, reason = "", "as asked"
        if guessed and kind != guessed:
            reason = f"as asked; they read as {guessed}: {reason}"
    else:
        guessed, reason = guess_kind(summary)
        kind = guessed
        problem = kind_problem(kind, summary)
        if problem is not None:  # the guess itself cannot train (e.g. classes 0/255)
            raise InputError(f"the labels read as {kind} ({reason}), and {kind} labels need "
                             f"{problem.replace('kind=', kind_setting + '=')}")
    heights = [p.shape[0] for p in layout.pairs]
    widths = [p.shape[1] for p in layout.pairs]
    dtypes = sorted({p.dtype for p in layout.pairs})
    pixel_sizes = tuple(p.pixel_size for p in layout.pairs)
    if layout.form == "stack":
        pixel_sizes = pixel_sizes * layout.pairs[0].planes
    fp = Fingerprint(
        source=str(layout.root), form=layout.form, layout=layout.describe(), images=layout.planes if layout.form == "stack"
        else len(layout.pairs), sampled=len(samples),
        heights=_three(heights), widths=_three(widths), dtype=", ".join(dtypes),
        channels=max(p.channels for p in layout.pairs),
        percentiles=intensity_percentiles([s.image for s in samples]), pixel_sizes=pixel_sizes,
        kind=kind, kind_reason=reason, class_fractions=class_fractions(kind, summary.counts),
        values=tuple(summary.values))
    if kind != "instances":
        return fp
    target = fp.common_pixel_size
    diameters, touching, total = [], 0, 0
    for sample in samples:
        factor = sample.pixel_size / target if target and sample.pixel_size else 1.0
        diameters.append(object_diameters(sample.labels, factor))
        t, n = touching_objects(sample.labels)
        touching, total = touching + t, total + n
    every = np.concatenate(diameters) if diameters else np.zeros(0)
    if not every.size:
        return fp
    p10, p50, p90 = (float(v) for v in np.percentile(every, (10, 50, 90)))
    from dataclasses import replace

    return replace(fp, objects=int(every.size), diameters=(p10, p50, p90), touching=touching / total if total else 0.0)


def _three(values: list[int]) -> tuple[int, int, int]:
    return int(min(values)), int(np.median(values)), int(max(values))


def _another_value(layout: DataLayout, summary: LabelSummary) -> Sample:
    """The sampled labels hold one value: the first label plane of the layout that holds another (read
    as a sample), or InputError when every label image holds that one value."""
    value = summary.values[0] if summary.values else 0
    for pair in layout.pairs:
        with open_stack(pair.labels, labels=True) as labels:
            for z in range(len(labels)):
                plane = labels.plane(z)
                if (plane != value).any():
                    with open_stack(pair.image) as images:
                        image = images.plane(z)
                    return Sample(image[None] if image.ndim == 2 else image, plane, pair.pixel_size, pair.image)
    where = layout.pairs[0].labels if layout.form == "stack" else str(layout.root / layout.labels)
    raise InputError(f"the labels ({where}) hold only the value {value} everywhere, so there is nothing to learn; "
                     "check that they are the right files (labels mark classes 0..K-1, object ids, or membranes 0 "
                     "between cells > 0)")
