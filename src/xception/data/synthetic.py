"""The built-in data set: procedurally rendered shapes, so that training needs no download.

Each image shows one shape (or, in multi-label mode, 1-4 shapes of distinct classes) over a
cluttered background. The class is the shape's geometry alone: colours, position, scale,
rotation, aspect, outline, background, distractors (thin lines, small irregular blobs) and
photometric jitter are random per image, so a model has to learn shape, not colour.

Image ``index`` of ``split`` is a pure function of ``(seed, split, index, image_size, mode)``
(and, through the labels, of ``classes``): every random draw comes from generators seeded with
those values, so the result does not depend on rendering order or on the number of worker
processes. Scene parameters are drawn in relative units before any per-pixel noise, so the same
index shows the same scene at every resolution.

``materialize`` writes a spec once into a cache folder in the layouts the image-folder pipeline
reads (``torchvision.datasets.ImageFolder`` for single-label, CSV manifests for multi-label).
``CLASS_NAMES`` is sorted, so the label indices returned by ``render`` are also the indices
``ImageFolder`` assigns to the class folders.

Difficulty, measured on the default 10 classes (6000 train / 1000 val, 72 px, 2-core CPU, one
torch thread): xception_tiny with AdamW reaches ~89% val top-1 after ~90 s of training and
~96% after ~3.5 min, while a 4-layer CNN with max-pooling is at 17% / 35% / 62% after 1 / 2 / 3
epochs and an all-strided 4-layer CNN stays at chance for 3 epochs; a linear model on raw
pixels is at chance. Architecture shows, and the default run fits in minutes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter
from tqdm import tqdm

from xception.files import cache_folder

#: Bump whenever rendered pixels change: cached folders are named after it.
RENDER_VERSION = 1

#: Shape families, sorted so that a label index is also ImageFolder's class index. A spec with
#: ``classes=k`` uses the first ``k``; the last two are extras beyond the default ten.
CLASS_NAMES: tuple[str, ...] = (
    "arrow",
    "circle",
    "crescent",
    "cross",
    "heart",
    "hexagon",
    "ring",
    "square",
    "star",
    "triangle",
    "wedge",
    "zigzag",
)

SPLITS: tuple[str, ...] = ("train", "val")
_SPLIT_IDS = {"train": 0, "val": 1}
_SUPERSAMPLE = 2  # draw at 2x and box-downscale: anti-aliased edges at any size
_GRID = 6  # smooth colour fields (background, gradient fills) are upsampled from GRID x GRID
_MIN_CONTRAST = 90.0  # RGB distance between a shape's colour and the background under it
_CLUTTER_SHIFT = 40  # per-channel: distractors stay faint next to the shapes
_MULTI_COUNTS = (1, 2, 3, 4)
_MULTI_COUNT_P = (0.35, 0.3, 0.2, 0.15)
_MULTI_DECAY = 0.75  # class k is drawn with weight decay**k: a few common classes, some rare
_MARKER = "spec.json"

Polygon = np.ndarray  # (n, 2) float points
Colour = tuple[int, int, int]
Background = tuple[Colour, Colour]  # the two ends of the background gradient


@dataclass(frozen=True)
class SyntheticSpec:
    """What to render; every field is part of the cached folder's name."""

    classes: int = 10
    train_per_class: int = 600  # single-label: images per class; multi-label: total/classes
    val_per_class: int = 100
    image_size: int = 96
    multi_label: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= len(CLASS_NAMES):
            raise ValueError(
                f"classes must be between 2 and {len(CLASS_NAMES)}, got {self.classes}"
            )
        for name in ("train_per_class", "val_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES[: self.classes]

    def split_size(self, split: str) -> int:
        """Images in ``split``: ``classes * <split>_per_class`` in both modes."""
        per_class = {"train": self.train_per_class, "val": self.val_per_class}[_check_split(split)]
        return self.classes * per_class

    @property
    def name(self) -> str:
        mode = "multi" if self.multi_label else "single"
        return (
            f"shapes-v{RENDER_VERSION}-{mode}-c{self.classes}-train{self.train_per_class}"
            f"-val{self.val_per_class}-{self.image_size}px-seed{self.seed}"
        )


def _check_split(split: str) -> str:
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


# ---------------------------------------------------------------------------------------------
# Geometry: each class is filled polygons minus hole polygons, centred, max radius 1.


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _circle_points(n: int, radius: float = 1.0, phase: float = 0.0) -> Polygon:
    angles = phase + np.arange(n) * (2 * math.pi / n)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> Polygon:
    points = _circle_points(10, phase=-math.pi / 2)
    return points * np.where(np.arange(10) % 2 == 0, 1.0, 0.4)[:, None]


def _heart() -> Polygon:
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1)


def _wedge() -> Polygon:
    arc = np.linspace(-0.9, 0.9, 24)  # a 103-degree pie slice
    return np.concatenate([[[0.0, 0.0]], np.stack([np.cos(arc), np.sin(arc)], axis=1)])


def _zigzag() -> Polygon:
    xs = np.linspace(-1, 1, 5)
    ys = np.array([-0.45, 0.45, -0.45, 0.45, -0.45])
    half = 0.2
    return np.concatenate([np.stack([xs, ys + half], 1), np.stack([xs, ys - half], 1)[::-1]])


def _cross(half_width: float = 0.3) -> Polygon:
    quarter = np.array([[half_width, 1], [half_width, half_width], [1, half_width]])
    return np.concatenate([quarter @ _rotation(-k * math.pi / 2).T for k in range(4)])


_ARROW = np.array([-1, 0.18, 0.15, 0.18, 0.15, 0.55, 1, 0, 0.15, -0.55, 0.15, -0.18, -1, -0.18])
_RAW_SHAPES: dict[str, tuple[list[Polygon], list[Polygon]]] = {
    "arrow": ([_ARROW.reshape(-1, 2)], []),
    "circle": ([_circle_points(64)], []),
    "crescent": ([_circle_points(64)], [_circle_points(64, 0.82) + np.array([0.45, 0.0])]),
    "cross": ([_cross()], []),
    "heart": ([_heart()], []),
    "hexagon": ([_circle_points(6)], []),
    "ring": ([_circle_points(64)], [_circle_points(64, 0.55)]),
    "square": ([_circle_points(4, phase=math.pi / 4)], []),
    "star": ([_star()], []),
    "triangle": ([_circle_points(3, phase=-math.pi / 2)], []),
    "wedge": ([_wedge()], []),
    "zigzag": ([_zigzag()], []),
}


def _normalise(fills: list[Polygon], holes: list[Polygon]) -> tuple[list[Polygon], list[Polygon]]:
    """Centre the filled part's bounding box and scale it to max radius 1, so that a shape's
    ``radius`` means the same extent for every class."""
    points = np.concatenate(fills).astype(np.float64)
    centre = (points.min(0) + points.max(0)) / 2
    scale = np.linalg.norm(points - centre, axis=1).max()
    return [(p - centre) / scale for p in fills], [(p - centre) / scale for p in holes]


_SHAPES = {name: _normalise(*_RAW_SHAPES[name]) for name in CLASS_NAMES}


# ---------------------------------------------------------------------------------------------
# Scene: everything random about one image, in relative units (image side = 1).


@dataclass(frozen=True)
class _Shape:
    label: int
    centre: tuple[float, float]
    matrix: np.ndarray  # 2x2: rotation, aspect and radius
    fill: Colour
    fill_to: Colour | None  # gradient fill end colour, or None for a solid fill
    fill_angle: float
    outline: Colour | None
    outline_width: float


@dataclass(frozen=True)
class _Line:
    start: tuple[float, float]
    end: tuple[float, float]
    width: float
    colour: Colour
    on_top: bool  # drawn over the shapes: partial occlusion


@dataclass(frozen=True)
class _Scene:
    background: Background
    background_angle: float
    background_noise: np.ndarray  # (_GRID, _GRID, 3) low-frequency offsets
    blobs: list[tuple[Polygon, Colour]]
    lines: list[_Line]
    shapes: list[_Shape]
    saturation: float
    brightness: float
    contrast: float
    blur: float
    noise: float


def _rgb(values: np.ndarray) -> Colour:
    red, green, blue = (int(v) for v in values)
    return red, green, blue


def _colour(rng: np.random.Generator) -> Colour:
    return _rgb(rng.integers(0, 256, 3))


def _contrasting(rng: np.random.Generator, against: Background) -> Colour:
    """A random colour far enough from both background ends to be visible everywhere."""
    refs = np.array(against, dtype=np.float64)
    for _ in range(64):
        colour = _colour(rng)
        if np.linalg.norm(refs - colour, axis=1).min() >= _MIN_CONTRAST:
            return colour
    return _rgb(255 - refs.mean(0))


def _labels(spec: SyntheticSpec, index: int, rng: np.random.Generator) -> list[int]:
    """Single-label: balanced. Multi-label: 1-4 distinct classes, class ``k`` with weight
    ``decay**k``; image ``k < classes`` always holds class ``k``, so every class is present in
    every split (a manifest reader derives the class list from the training labels)."""
    if not spec.multi_label:
        return [index % spec.classes]
    count = min(int(rng.choice(_MULTI_COUNTS, p=_MULTI_COUNT_P)), spec.classes)
    weights = _MULTI_DECAY ** np.arange(spec.classes)
    forced = [index] if index < spec.classes else []
    if forced:
        weights[index] = 0.0
    drawn = rng.choice(spec.classes, count - len(forced), replace=False, p=weights / weights.sum())
    return forced + [int(c) for c in drawn]


def _place(rng: np.random.Generator, radii: list[float]) -> list[tuple[float, float]]:
    """Centres keeping shapes (mostly) inside the image and overlapping only a little."""
    centres: list[tuple[float, float]] = []
    for radius in radii:
        low, high = 0.8 * radius, 1 - 0.8 * radius
        best, best_gap = (0.5, 0.5), -math.inf
        for _ in range(30):
            x, y = (float(v) for v in rng.uniform(low, high, 2))
            candidate = (x, y)
            placed = zip(centres, radii[: len(centres)], strict=True)
            gap = min(
                (math.dist(candidate, c) - 0.75 * (radius + r) for c, r in placed),
                default=math.inf,
            )
            if gap > best_gap:
                best, best_gap = candidate, gap
            if gap >= 0:
                break
        centres.append(best)
    return centres


def _shape(
    rng: np.random.Generator, label: int, centre: tuple[float, float], radius: float, bg: Background
) -> _Shape:
    aspect = rng.uniform(0.87, 1.15)
    matrix = (
        radius
        * _rotation(rng.uniform(0, 2 * math.pi))
        @ np.diag([aspect, 1 / aspect])
        @ _rotation(rng.uniform(0, 2 * math.pi))
    )
    fill = _contrasting(rng, bg)
    fill_to = _contrasting(rng, bg) if rng.random() < 0.3 else None
    outlined = rng.random() < 0.4
    return _Shape(
        label=label,
        centre=centre,
        matrix=matrix,
        fill=fill,
        fill_to=fill_to,
        fill_angle=float(rng.uniform(0, 2 * math.pi)),
        outline=_colour(rng) if outlined else None,
        outline_width=float(rng.uniform(0.01, 0.03)),
    )


def _near(rng: np.random.Generator, background: Background) -> Colour:
    """A low-contrast clutter colour: the background shifted by at most ``_CLUTTER_SHIFT``."""
    base = np.asarray(background[int(rng.integers(0, 2))])
    shift = rng.integers(-_CLUTTER_SHIFT, _CLUTTER_SHIFT + 1, 3)
    return _rgb(np.clip(base + shift, 0, 255))


def _blob(rng: np.random.Generator, background: Background) -> tuple[Polygon, Colour]:
    """A small irregular polygon: clutter at a scale no class shape is drawn at."""
    vertices = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0, 2 * math.pi, vertices))
    radii = rng.uniform(0.4, 1.0, vertices) * rng.uniform(0.025, 0.06)
    centre = rng.uniform(0, 1, 2)
    points = centre + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return points, _near(rng, background)


def _line(rng: np.random.Generator, background: Background) -> _Line:
    start, end = rng.uniform(-0.1, 1.1, (2, 2))
    return _Line(
        start=(float(start[0]), float(start[1])),
        end=(float(end[0]), float(end[1])),
        width=float(rng.uniform(0.006, 0.02)),
        colour=_near(rng, background),
        on_top=bool(rng.random() < 0.25),
    )


def _scene(spec: SyntheticSpec, split: str, index: int) -> _Scene:
    rng = np.random.default_rng([spec.seed, _SPLIT_IDS[split], int(spec.multi_label), index, 0])
    labels = _labels(spec, index, rng)
    base = rng.integers(0, 256, 3)
    other = np.clip(base + rng.integers(-45, 46, 3), 0, 255)
    bg = (_rgb(base), _rgb(other))
    if spec.multi_label:
        radii = [float(rng.uniform(0.125, 0.24)) for _ in labels]
    else:
        radii = [float(rng.uniform(0.15, 0.35))]  # diameter 30-70% of the image
    centres = _place(rng, radii)
    return _Scene(
        background=bg,
        background_angle=float(rng.uniform(0, 2 * math.pi)),
        background_noise=rng.normal(0, rng.uniform(4, 14), (_GRID, _GRID, 3)),
        blobs=[_blob(rng, bg) for _ in range(int(rng.integers(0, 5)))],
        lines=[_line(rng, bg) for _ in range(int(rng.integers(0, 4)))],
        shapes=[
            _shape(rng, label, centre, radius, bg)
            for label, centre, radius in zip(labels, centres, radii, strict=True)
        ],
        saturation=float(rng.uniform(0.7, 1.3)),
        brightness=float(rng.uniform(0.8, 1.2)),
        contrast=float(rng.uniform(0.75, 1.25)),
        blur=float(rng.uniform(0, 0.8)) if rng.random() < 0.5 else 0.0,
        noise=float(rng.uniform(0, 8)),
    )


# ---------------------------------------------------------------------------------------------
# Drawing.


def _linear_ramp(size: int, angle: float) -> np.ndarray:
    """(size, size) values in [0, 1] increasing along ``angle``."""
    coords = (np.arange(size) + 0.5) / size
    ramp = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]
    return (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-9)


def _gradient(start: Colour, end: Colour, angle: float) -> np.ndarray:
    """A linear colour ramp on the ``_GRID`` lattice."""
    ramp = _linear_ramp(_GRID, angle)[..., None]
    return np.asarray(start, np.float64) * (1 - ramp) + np.asarray(end, np.float64) * ramp


def _smooth_field(lattice: np.ndarray, size: int) -> Image.Image:
    """Bicubic upsampling of a small (g, g, 3) lattice: smooth colour fields at little cost."""
    small = Image.fromarray(np.clip(lattice, 0, 255).round().astype(np.uint8), "RGB")
    return small.resize((size, size), Image.Resampling.BICUBIC)


def _background(scene: _Scene, size: int) -> Image.Image:
    lattice = _gradient(*scene.background, scene.background_angle) + scene.background_noise
    return _smooth_field(lattice, size)


def _to_pixels(points: np.ndarray, size: int) -> list[tuple[float, float]]:
    return [(float(x) * size, float(y) * size) for x, y in points]


def _draw_line(draw: ImageDraw.ImageDraw, line: _Line, size: int) -> None:
    xy = _to_pixels(np.array([line.start, line.end]), size)
    draw.line(xy, fill=line.colour, width=max(1, round(line.width * size)))


def _draw_shape(canvas: Image.Image, shape: _Shape, size: int) -> None:
    """Composite one shape through a mask (holes show the background); an outline is an inner
    border: the silhouette in the outline colour, the fill drawn inset by the border width."""
    fills, holes = _SHAPES[CLASS_NAMES[shape.label]]
    edges = [_to_pixels(shape.centre + p @ shape.matrix.T, size) for p in fills + holes]
    mask = Image.new("L", canvas.size, 0)
    draw = ImageDraw.Draw(mask)
    for i, polygon in enumerate(edges):
        draw.polygon(polygon, fill=255 if i < len(fills) else 0)
    box = (0, 0, size, size)
    if shape.outline is not None:
        canvas.paste(shape.outline, box, mask)
        width = 2 * max(1, round(shape.outline_width * size))
        for polygon in edges:
            draw.line([*polygon, polygon[0]], fill=0, width=width, joint="curve")
    if shape.fill_to is None:
        canvas.paste(shape.fill, box, mask)
    else:
        ramp = _smooth_field(_gradient(shape.fill, shape.fill_to, shape.fill_angle), size)
        canvas.paste(ramp, box, mask)


def _draw(scene: _Scene, size: int, rng: np.random.Generator) -> Image.Image:
    big = size * _SUPERSAMPLE
    canvas = _background(scene, big)
    draw = ImageDraw.Draw(canvas)
    for points, colour in scene.blobs:
        draw.polygon(_to_pixels(points, big), fill=colour)
    for line in scene.lines:
        if not line.on_top:
            _draw_line(draw, line, big)
    for shape in scene.shapes:
        _draw_shape(canvas, shape, big)
    for line in scene.lines:
        if line.on_top:
            _draw_line(draw, line, big)
    image = canvas.reduce(_SUPERSAMPLE)
    image = ImageEnhance.Color(image).enhance(scene.saturation)
    image = ImageEnhance.Brightness(image).enhance(scene.brightness)
    image = ImageEnhance.Contrast(image).enhance(scene.contrast)
    if scene.blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(scene.blur))
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * scene.noise
    pixels = np.asarray(image, np.float32) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def render(spec: SyntheticSpec, split: str, index: int) -> tuple[Image.Image, list[int]]:
    """Image ``index`` of ``split`` and its sorted label indices into ``CLASS_NAMES``.

    Single-label: label ``index % classes`` (balanced). Multi-label: 1-4 distinct classes,
    class ``k`` drawn with weight ``0.75**k``, and image ``k < classes`` always holds class ``k``.
    """
    _check_split(split)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    scene = _scene(spec, split, index)
    pixel_rng = np.random.default_rng(
        [spec.seed, _SPLIT_IDS[split], int(spec.multi_label), index, 1]
    )
    image = _draw(scene, spec.image_size, pixel_rng)
    return image, sorted(shape.label for shape in scene.shapes)


# ---------------------------------------------------------------------------------------------
# Materializing to disk.


def default_cache_dir() -> Path:
    return cache_folder("datasets")


def _marker(spec: SyntheticSpec) -> dict:
    return {
        "name": spec.name,
        "render_version": RENDER_VERSION,
        "spec": dataclasses.asdict(spec),
        "class_names": list(spec.class_names),
        "sizes": {split: spec.split_size(split) for split in SPLITS},
    }


def is_complete(folder: Path, spec: SyntheticSpec) -> bool:
    """True when ``folder`` holds a finished rendering of ``spec`` (its marker is written last)."""
    try:
        return json.loads((folder / _MARKER).read_text()) == _marker(spec)
    except (OSError, ValueError):
        return False


def _relative_path(spec: SyntheticSpec, split: str, index: int, label: int) -> str:
    if spec.multi_label:
        return f"images/{split}/{index:06d}.png"
    return f"{split}/{CLASS_NAMES[label]}/{index:06d}.png"


def _render_to_file(
    task: tuple[SyntheticSpec, str, int, str],
) -> tuple[str, tuple[int, str, list[int]]]:
    """Pool worker: render one image and save it; returns what the manifest needs."""
    spec, split, index, root = task
    image, labels = render(spec, split, index)
    relative = _relative_path(spec, split, index, labels[0])
    image.save(Path(root) / relative, format="PNG", compress_level=1)
    return split, (index, relative, labels)


def _prepare_folders(spec: SyntheticSpec, root: Path) -> None:
    for split in SPLITS:
        if spec.multi_label:
            (root / "images" / split).mkdir(parents=True)
        else:
            for name in spec.class_names:
                (root / split / name).mkdir(parents=True)


def _write_manifest(spec: SyntheticSpec, root: Path, split: str, rows: list) -> None:
    with open(root / f"{split}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels"])
        for _, relative, labels in sorted(rows):
            writer.writerow([relative, ";".join(CLASS_NAMES[k] for k in labels)])


@contextlib.contextmanager
def _mapper(workers: int) -> Iterator[Callable]:
    if workers <= 0:
        yield map
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield lambda fn, tasks: pool.imap_unordered(fn, tasks, chunksize=16)


def _render_all(spec: SyntheticSpec, root: Path, workers: int, progress: bool) -> None:
    _prepare_folders(spec, root)
    tasks = [(spec, split, i, str(root)) for split in SPLITS for i in range(spec.split_size(split))]
    rows: dict[str, list] = {split: [] for split in SPLITS}
    with (
        _mapper(workers) as mapper,
        tqdm(
            total=len(tasks), desc=f"rendering {spec.name}", disable=None if progress else True
        ) as bar,
    ):
        for split, result in mapper(_render_to_file, tasks):  # unordered with a pool
            rows[split].append(result)
            bar.update()
    if spec.multi_label:
        for split in SPLITS:
            _write_manifest(spec, root, split, rows[split])


def _partial_prefix(name: str) -> str:
    return f".{name}.partial-{socket.gethostname()}-"


def _remove_stale_partials(cache_dir: Path, name: str) -> None:
    """Delete this host's leftovers of killed runs (their process is gone)."""
    prefix = _partial_prefix(name)
    for path in cache_dir.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def materialize(
    spec: SyntheticSpec,
    cache_dir: Path | None = None,
    workers: int = 0,
    progress: bool = True,
) -> Path:
    """Render ``spec`` into ``cache_dir / spec.name`` once and return that folder.

    Single-label: ``train/<class>/<index>.png`` and ``val/...`` (ImageFolder layout).
    Multi-label: ``images/<split>/<index>.png`` plus ``train.csv``/``val.csv`` with header
    ``path,labels`` (``path`` relative to the folder, labels ``;``-separated class names).
    Rendering goes to a temporary sibling that is renamed into place only when complete, so a
    killed run never leaves a folder that looks finished. ``workers > 0`` uses a process pool;
    the pixels are the same either way.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / spec.name
    if is_complete(final, spec):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(cache_dir, spec.name)
    partial = cache_dir / f"{_partial_prefix(spec.name)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir()
        _render_all(spec, partial, workers, progress)
        (partial / _MARKER).write_text(json.dumps(_marker(spec), indent=2) + "\n")
        if final.exists() and not is_complete(final, spec):
            shutil.rmtree(final)  # not ours: a folder without a valid marker is never complete
        try:
            os.replace(partial, final)
        except OSError:
            if not is_complete(final, spec):  # lost a race to a concurrent run: fine if it won
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final
