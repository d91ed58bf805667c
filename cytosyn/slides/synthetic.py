"""Synthetic H&E whole-slide images: Aperio-style SVS files that OpenSlide and tiffslide both open.

Tests, benchmarks and the demo need slides whose geometry (size, MPP, pyramid) and content
(stripes of a known physical period, artifacts with a ground-truth mask) are known exactly,
without shipping gigabytes of real scans. Everything written is a pure function of the
arguments: the same call produces the same bytes.

The slide is described in physical units (µm) by a small layout — coarse random fields for the
tissue outline, cellularity, stain strength and fibre direction; a list of nuclei; a list of
artifact shapes — and rendered tile by tile at the requested MPP, so a 0.25 and a 0.5 µm/px slide
of the same seed show the same tissue. Fine texture comes from periodic noise images read by
wrap-around slicing: a tile's pixels depend only on its position, never on rendering order, so
tiles are rendered and JPEG-encoded in parallel, a few at a time. Memory stays bounded by the
layout, the textures and the level-1 image (1/16 of level 0), which is filled as level-0 tiles
go by and from which the lower levels and the thumbnail are made.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import tifffile
from scipy import ndimage
from tqdm import tqdm

from cytosyn.io.atomic import atomic_path, write_bytes_atomic, write_text_atomic
from cytosyn.io.hashing import stable_hash

ARTIFACT_TYPES = ("pen", "blur", "fold", "bubble")
MASK_DOWNSAMPLE = 16
PATTERNS = ("he", "stripes")

_LIBRARY = "Aperio Image Library v12.0.15"
_LEVEL_FACTOR = 4  # Aperio pyramids step by 4
_MIN_LEVEL_SIDE = 512  # stop adding levels once the small side drops below this
_THUMBNAIL_SIDE = 1024

# Independent random streams, all derived from the seed: the texture draws depend on the MPP
# and must not shift the tissue layout; field noise and nuclei are drawn per block of the slide,
# so each place depends only on its position, not on how large the slide is.
_STREAM_TEXTURES, _STREAM_FIBRES, _STREAM_LAYOUT, _STREAM_FIELDS, _STREAM_NUCLEI, _STREAM_ARTIFACTS = range(6)
_NOISE_BLOCK_NODES = 32
_NUCLEUS_BLOCK_UM = 256.0

_FIELD_UM = 16.0  # spacing of the coarse random fields
_FIELD_MARGIN = 8  # field nodes beyond the slide edge: edge tiles and blur margins reach past it
_GLASS = np.array([241.0, 240.0, 242.0], np.float32)  # bright field through bare glass
_PIXEL_NOISE = 1.2  # grey levels of sensor noise
_NOISE_PERIOD_PX = 521  # prime, so the noise never lines up with the tile grid

# Optical density per unit of stain, normalised: Ruifrok & Johnston's hematoxylin, and an eosin
# with a little more blue absorption, which reads as the pink of scanned TCGA slides.
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32) / np.float32(np.linalg.norm([0.65, 0.70, 0.29]))
_EOSIN = np.array([0.10, 0.90, 0.38], np.float32) / np.float32(np.linalg.norm([0.10, 0.90, 0.38]))

_EDGE_RAGGEDNESS_UM = 4.0
_EDGE_SOFTNESS_UM = 2.0
_NUCLEUS_DENSITY_STROMA = 1 / 30.0**2  # nuclei per µm²
_NUCLEUS_DENSITY_CELLULAR = 1 / 11.0**2
_BLUR_SIGMA_UM = 3.0
_FOLD_EXTRA_LAYER = 0.9  # a fold doubles the section: nearly twice the stain
_BUBBLE_DARK_RIM_UM = 4.0
_BUBBLE_BRIGHT_RIM_UM = 7.0
_LABEL_PRIORITY = ("fold", "blur", "bubble", "pen")  # lowest first
_INKS = {  # optical density of marker ink per R, G, B channel
    "green": (1.3, 0.35, 0.95),
    "blue": (1.35, 0.85, 0.2),
    "black": (1.9, 1.8, 1.7),
}


@dataclass(frozen=True)
class SyntheticSlide:
    path: Path
    width: int
    height: int
    mpp: float
    artifact_mask_path: Path | None


@dataclass(frozen=True)
class ArtifactMask:
    """Ground truth of a synthetic slide's artifacts: one label per ``downsample``² level-0 pixels."""

    labels: np.ndarray
    downsample: int
    names: dict[int, str]

    def fraction(self, x: int, y: int, w: int, h: int) -> dict[str, float]:
        """Fraction of the level-0 rectangle (x, y, w, h) covered by each artifact type.

        Label cells are weighted by how much of them lies inside the rectangle; parts of the
        rectangle outside the slide count as artifact-free.
        """
        rows_lo, row_weights = _cell_overlaps(y, h, self.downsample, self.labels.shape[0])
        cols_lo, col_weights = _cell_overlaps(x, w, self.downsample, self.labels.shape[1])
        block = self.labels[rows_lo : rows_lo + len(row_weights), cols_lo : cols_lo + len(col_weights)]
        area = np.outer(row_weights, col_weights)
        total = float(w) * float(h)
        return {name: float(area[block == code].sum()) / total for code, name in sorted(self.names.items())}


def _cell_overlaps(start: int, length: int, cell: int, n_cells: int) -> tuple[int, np.ndarray]:
    """First cell index and, per cell, the length of [start, start+length) inside it."""
    lo = max(0, start // cell)
    hi = min(n_cells, -(-(start + length) // cell))
    if hi <= lo:
        return 0, np.zeros(0)
    edges = np.arange(lo, hi + 1) * cell
    return lo, np.minimum(edges[1:], start + length) - np.maximum(edges[:-1], start)


# --------------------------------------------------------------------------- public entry points


def write_synthetic_slide(
    path: str | Path,
    *,
    width: int,
    height: int,
    mpp: float = 0.2520,
    seed: int = 0,
    pattern: str = "he",
    stripe_period_um: float = 10.0,
    artifacts: Sequence[str] = (),
    write_mpp: bool = True,
    jpeg_quality: int = 90,
    tile_size: int = 256,
) -> SyntheticSlide:
    """Write an Aperio-style pyramidal SVS of synthetic H&E (or stripes) and its artifact ground truth.

    Layout: level 0 tiled JPEG, a stripped thumbnail as the second directory (as Aperio writes
    it, which is what tiffslide expects), then levels downsampled by 4, 16, … With artifacts,
    ``<stem>.artifacts.png`` and ``<stem>.artifacts.json`` are written beside the slide; see
    ``load_artifact_mask``. With ``write_mpp=False`` the file carries no MPP at all.
    """
    path = Path(path)
    kinds = _check_arguments(width, height, mpp, seed, pattern, stripe_period_um, artifacts, jpeg_quality, tile_size)
    renderer = _Renderer.build(width, height, mpp, seed, pattern, stripe_period_um, kinds, tile_size)

    mask_path = _write_ground_truth(path, renderer, kinds)
    levels = _level_sizes(width, height)
    description = _DescriptionWriter(width, height, mpp, tile_size, jpeg_quality, write_mpp)
    workers = max(1, min(4, len(os.sched_getaffinity(0))))
    level1 = np.zeros((height // _LEVEL_FACTOR, width // _LEVEL_FACTOR, 3), np.uint8)
    with atomic_path(path) as tmp, ThreadPoolExecutor(workers) as pool:
        with tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 2**32 - 2**28) as tif:
            common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": jpeg_quality},
                          metadata=None, software=False, maxworkers=workers)
            tif.write(
                _level0_tiles(renderer, level1, pool, workers, jpeg_quality),
                shape=(height, width, 3), dtype=np.uint8, tile=(tile_size, tile_size),
                description=description.level(0, width, height), **_resolution(mpp, write_mpp), **common,
            )
            thumbnail = _thumbnail(level1, width, height)
            tif.write(
                thumbnail, rowsperstrip=16,
                description=description.thumbnail(thumbnail.shape[1], thumbnail.shape[0]),
                **_resolution(mpp * width / thumbnail.shape[1], write_mpp), **common,
            )
            image = level1
            for index, (level_w, level_h) in enumerate(levels[1:], start=1):
                if index > 1:
                    image = cv2.resize(image[: level_h * _LEVEL_FACTOR, : level_w * _LEVEL_FACTOR], (level_w, level_h),
                                       interpolation=cv2.INTER_AREA)
                tif.write(
                    image, tile=(tile_size, tile_size),
                    description=description.level(index, level_w, level_h),
                    **_resolution(mpp * _LEVEL_FACTOR**index, write_mpp), **common,
                )
    return SyntheticSlide(path=path, width=width, height=height, mpp=mpp, artifact_mask_path=mask_path)


def load_artifact_mask(slide_path: str | Path) -> ArtifactMask | None:
    """The artifact ground truth written beside a synthetic slide, or None if it has none."""
    png, meta = _ground_truth_paths(Path(slide_path))
    if not meta.exists():
        return None
    info = json.loads(meta.read_text())
    labels = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise ValueError(f"artifact label map {png} is missing or unreadable")
    return ArtifactMask(labels=labels, downsample=int(info["downsample"]),
                        names={int(code): name for code, name in info["labels"].items()})


# TSS codes checked against tissueSourceSite.csv: A1/A2/AR/BH breast, AA/A6 colon, 05/44 lung
# adenocarcinoma, B0/CJ kidney clear cell.
_DEMO_SITES = ("A1", "AA", "05", "B0", "A2", "A6", "44", "AR", "BH", "CJ")
# Paired with the MPPs below, every artifact type appears at both 40x and 20x.
_DEMO_ARTIFACTS = (("pen", "blur"), (), ("pen", "fold"), (), ("fold", "bubble"), (), ("blur", "bubble"), ())
_DEMO_MPPS = (0.2520, 0.2520, 0.5020, 0.5020)


def demo_cohort(
    folder: str | Path, n_slides: int = 8, seed: int = 0, size_um: tuple[float, float] = (2600, 2000)
) -> list[SyntheticSlide]:
    """Write a small TCGA-like cohort of synthetic diagnostic slides, named as GDC names them.

    Slides spread over several projects and tissue source sites, mix 40x and 20x, and about half
    carry artifacts. A slide already present with the right size is left alone, so a second call
    writes nothing.
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    patients: set[str] = set()
    slides = []
    for index in tqdm(range(n_slides), desc="demo slides", unit="slide", dynamic_ncols=True):
        patient = _new_patient_code(rng, patients)
        slide_uuid = uuid.UUID(bytes=rng.bytes(16), version=4)
        slide_id = f"TCGA-{_DEMO_SITES[index % len(_DEMO_SITES)]}-{patient}-01Z-00-DX1"
        mpp = _DEMO_MPPS[index % len(_DEMO_MPPS)]
        kinds = _DEMO_ARTIFACTS[index % len(_DEMO_ARTIFACTS)]
        width, height = round(size_um[0] / mpp), round(size_um[1] / mpp)
        path = folder / f"{slide_id}.{str(slide_uuid).upper()}.svs"
        if _is_complete(path, width, height, bool(kinds)):
            mask_path = _ground_truth_paths(path)[0] if kinds else None
            slides.append(SyntheticSlide(path, width, height, mpp, mask_path))
        else:
            slides.append(write_synthetic_slide(path, width=width, height=height, mpp=mpp,
                                                seed=stable_hash(seed, slide_id), artifacts=kinds))
    return slides


def _new_patient_code(rng: np.random.Generator, taken: set[str]) -> str:
    alphabet = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    code = "".join(rng.choice(alphabet, 4))
    while code in taken:
        code = "".join(rng.choice(alphabet, 4))
    taken.add(code)
    return code


def _is_complete(path: Path, width: int, height: int, with_artifacts: bool) -> bool:
    if not path.exists() or (with_artifacts and not all(p.exists() for p in _ground_truth_paths(path))):
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            return tif.pages.first.shape[:2] == (height, width)
    except (OSError, ValueError, tifffile.TiffFileError):
        return False


# --------------------------------------------------------------------------- file layout


def _check_arguments(width, height, mpp, seed, pattern, stripe_period_um, artifacts, jpeg_quality, tile_size) -> tuple[str, ...]:
    if width < 1 or height < 1:
        raise ValueError(f"slide size must be positive, got {width}x{height}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if not stripe_period_um > 0:
        raise ValueError(f"stripe_period_um must be positive, got {stripe_period_um}")
    unknown = set(artifacts) - set(ARTIFACT_TYPES)
    if unknown:
        raise ValueError(f"unknown artifact types {sorted(unknown)}; known: {ARTIFACT_TYPES}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if tile_size < 16 or tile_size % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16 (JPEG chroma blocks), got {tile_size}")
    # A canonical order makes ("blur", "pen") and ("pen", "blur") write the same file.
    return tuple(kind for kind in ARTIFACT_TYPES if kind in artifacts)


def _level_sizes(width: int, height: int) -> list[tuple[int, int]]:
    sizes = [(width, height)]
    while min(sizes[-1]) >= _MIN_LEVEL_SIDE:
        factor = _LEVEL_FACTOR ** len(sizes)
        sizes.append((width // factor, height // factor))
    return sizes


def _thumbnail(level1: np.ndarray, width: int, height: int) -> np.ndarray:
    scale = min(_THUMBNAIL_SIDE / max(width, height), 1 / _LEVEL_FACTOR)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    source = level1 if level1.size else np.full((1, 1, 3), 240, np.uint8)
    return cv2.resize(source, size, interpolation=cv2.INTER_AREA)


def _resolution(mpp: float, write_mpp: bool) -> dict:
    # tifffile writes XResolution/YResolution in any case; without an MPP they are 1/1 with
    # ResolutionUnit NONE, which no reader turns into a pixel size.
    if not write_mpp:
        return {}
    return {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}


def _objective_power(mpp: float) -> int:
    # Scanners report the nominal objective: 40x for ~0.25 µm/px, 20x for ~0.5 µm/px.
    return min((5, 10, 20, 40, 80), key=lambda power: abs(math.log(power * mpp / 10)))


def _format_mpp(mpp: float) -> str:
    return f"{mpp:.4f}" if round(mpp, 4) == mpp else repr(float(mpp))


@dataclass(frozen=True)
class _DescriptionWriter:
    """ImageDescription strings in the form Aperio ImageScope writes them."""

    width: int
    height: int
    mpp: float
    tile: int
    quality: int
    write_mpp: bool

    def _properties(self) -> str:
        # No Filename field: the bytes would then depend on the path, not only on the content.
        fields = [f"AppMag = {_objective_power(self.mpp)}", "ScanScope ID = CYTOSYN-SYNTHETIC"]
        if self.write_mpp:
            fields.append(f"MPP = {_format_mpp(self.mpp)}")
        return "|" + "|".join(fields)

    def level(self, index: int, level_width: int, level_height: int) -> str:
        region = f"{self.width}x{self.height} [0,0 {self.width}x{self.height}] ({self.tile}x{self.tile})"
        reduced = f" -> {level_width}x{level_height}" if index else ""
        return f"{_LIBRARY} \r\n{region}{reduced} JPEG/RGB Q={self.quality}{self._properties()}"

    def thumbnail(self, thumb_width: int, thumb_height: int) -> str:
        return f"{_LIBRARY} \r\n{self.width}x{self.height} -> {thumb_width}x{thumb_height} - {self._properties()}"


def _level0_tiles(renderer: _Renderer, level1: np.ndarray, pool: Executor, workers: int,
                  quality: int) -> Iterator[bytes]:
    """JPEG-encoded level-0 tiles in TIFF order; each also fills its block of the level-1 image.

    Workers encode as well as render: tifffile's own parallel encoder first gathers 512 MB of
    raw tiles, which would defeat the bounded memory this generator promises.
    """
    size = renderer.tile_size
    small = size // _LEVEL_FACTOR

    def render(origin: tuple[int, int]) -> bytes:
        x0, y0 = origin
        tile = renderer.render(x0, y0, size, size)
        block = level1[y0 // _LEVEL_FACTOR : y0 // _LEVEL_FACTOR + small, x0 // _LEVEL_FACTOR : x0 // _LEVEL_FACTOR + small]
        if block.size:
            reduced = cv2.resize(tile, (small, small), interpolation=cv2.INTER_AREA)
            block[...] = reduced[: block.shape[0], : block.shape[1]]
        # What tifffile does for compression="jpeg" on RGB: YCbCr with 2x2 chroma subsampling.
        return imagecodecs.jpeg_encode(tile, level=quality, colorspace="RGB", outcolorspace="YCBCR",
                                       subsampling=(2, 2))

    origins = ((x, y) for y in range(0, renderer.height, size) for x in range(0, renderer.width, size))
    return _ordered_map(pool, render, origins, lookahead=4 * workers)


def _ordered_map(pool: Executor, fn: Callable, items: Iterable, lookahead: int) -> Iterator:
    """``pool.map`` that keeps at most ``lookahead`` results in flight instead of all of them."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= lookahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _ground_truth_paths(slide_path: Path) -> tuple[Path, Path]:
    stem = slide_path.stem
    return slide_path.with_name(f"{stem}.artifacts.png"), slide_path.with_name(f"{stem}.artifacts.json")


def _write_ground_truth(path: Path, renderer: _Renderer, kinds: tuple[str, ...]) -> Path | None:
    png, meta = _ground_truth_paths(path)
    if not kinds:
        # A slide rewritten without artifacts must not keep an earlier run's ground truth.
        png.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        return None
    ok, encoded = cv2.imencode(".png", renderer.artifact_labels(MASK_DOWNSAMPLE))
    if not ok:
        raise RuntimeError(f"could not encode the artifact label map for {path}")
    write_bytes_atomic(png, encoded.tobytes())
    info = {
        "downsample": MASK_DOWNSAMPLE,
        "labels": {str(ARTIFACT_TYPES.index(kind) + 1): kind for kind in kinds},
        "width": renderer.width,
        "height": renderer.height,
    }
    write_text_atomic(meta, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return png


# --------------------------------------------------------------------------- textures and fields


@dataclass(frozen=True)
class _Texture:
    """A periodic image, padded by wrap-around so any window up to ``pad`` pixels is one slice."""

    data: np.ndarray
    period: int

    def window(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        ox, oy = x0 % self.period, y0 % self.period
        return self.data[oy : oy + h, ox : ox + w]


def _filtered_noise(rng, period_px, mpp, sigma_along_um, sigma_across_um, angle, pad) -> _Texture:
    """Periodic Gaussian-filtered white noise, zero mean and unit variance.

    Filtering in the Fourier domain keeps the result exactly periodic; an anisotropic filter
    gives streaks running along ``angle`` (fibres).
    """
    white = rng.standard_normal((period_px, period_px), dtype=np.float32)
    fy = np.fft.fftfreq(period_px, d=mpp)[:, None]
    fx = np.fft.rfftfreq(period_px, d=mpp)[None, :]
    along = fx * math.cos(angle) + fy * math.sin(angle)
    across = -fx * math.sin(angle) + fy * math.cos(angle)
    gain = np.exp(-2 * math.pi**2 * (sigma_along_um**2 * along**2 + sigma_across_um**2 * across**2))
    noise = np.fft.irfft2(np.fft.rfft2(white) * gain, s=white.shape)
    noise = ((noise - noise.mean()) / noise.std()).astype(np.float32)
    return _Texture(np.pad(noise, ((0, pad), (0, pad)), mode="wrap"), period_px)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _smooth_noise(seed: int, channel: int, shape: tuple[int, int], sigma_um: float) -> np.ndarray:
    """Gaussian-filtered white noise on the field grid, zero mean and unit variance."""
    block = _NOISE_BLOCK_NODES
    white = np.block([
        [_rng(seed, _STREAM_FIELDS, channel, i, j).standard_normal((block, block)) for j in range(-(-shape[1] // block))]
        for i in range(-(-shape[0] // block))
    ])[: shape[0], : shape[1]]
    sigma = sigma_um / _FIELD_UM
    # Normalise by the filter's gain on white noise, not by the sample: the sample's statistics
    # would depend on the slide's extent.
    delta = np.zeros(2 * math.ceil(4 * sigma) + 1)
    delta[len(delta) // 2] = 1
    gain = float((ndimage.gaussian_filter1d(delta, sigma) ** 2).sum())
    return ndimage.gaussian_filter(white, sigma, mode="reflect") / gain


def _bspline(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uniform cubic B-spline: index of the first of four nodes and their weights, per position."""
    base = np.floor(t)
    f = (t - base)[:, None]
    weights = np.concatenate(
        [(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3], axis=1
    ) / 6
    return base.astype(np.int64) - 1, weights.astype(np.float32)


def _node_coordinate(position_um: np.ndarray) -> np.ndarray:
    return position_um / _FIELD_UM + _FIELD_MARGIN


def _spline_matrix(first_px: int, count: int, mpp: float, n_nodes: int) -> tuple[int, np.ndarray]:
    """Matrix that evaluates fields along one axis at pixel centres first_px … first_px+count-1.

    The fields are smooth, so a window of them is (rows matrix) @ nodes @ (columns matrix)ᵀ,
    the same numbers whichever window a pixel falls in.
    """
    start, weights = _bspline(_node_coordinate((first_px + np.arange(count) + 0.5) * mpp))
    index = np.clip(start[:, None] + np.arange(4), 0, n_nodes - 1)
    lo = int(index.min())
    matrix = np.zeros((count, int(index.max()) - lo + 1), np.float32)
    np.add.at(matrix, (np.arange(count)[:, None], index - lo), weights)
    return lo, matrix


def _separable_product(rows: np.ndarray, nodes: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """rows @ nodes[c] @ cols.T for every channel c, as two matrix products.

    cv2.gemm rather than numpy's matmul: for these small products OpenBLAS starts threads that
    spin against the tile workers and made rendering several times slower on a loaded machine.
    """
    channels, ky, kx = nodes.shape
    by_row = cv2.gemm(rows, np.ascontiguousarray(nodes.transpose(1, 0, 2)).reshape(ky, channels * kx), 1, None, 0)
    by_channel = np.ascontiguousarray(by_row.reshape(-1, channels, kx).transpose(1, 0, 2)).reshape(-1, kx)
    return cv2.gemm(by_channel, cols, 1, None, 0, flags=cv2.GEMM_2_T).reshape(channels, rows.shape[0], cols.shape[0])


def _nucleus_block(seed: int, by: int, bx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate nuclei of one block: positions (µm) and eight uniform numbers each for their traits."""
    rng = _rng(seed, _STREAM_NUCLEI, by, bx)
    count = rng.poisson(_NUCLEUS_DENSITY_CELLULAR * _NUCLEUS_BLOCK_UM**2)
    x = (bx + rng.random(count)) * _NUCLEUS_BLOCK_UM
    y = (by + rng.random(count)) * _NUCLEUS_BLOCK_UM
    return x, y, rng.random((8, count))


def _sample_points(fields: np.ndarray, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """Fields (C, gy, gx) at arbitrary points, with the same spline as the pixel windows."""
    xs, wx = _bspline(_node_coordinate(x_um))
    ys, wy = _bspline(_node_coordinate(y_um))
    out = np.zeros((fields.shape[0], len(x_um)), np.float32)
    for a in range(4):
        iy = np.clip(ys + a, 0, fields.shape[1] - 1)
        for b in range(4):
            ix = np.clip(xs + b, 0, fields.shape[2] - 1)
            out += fields[:, iy, ix] * (wy[:, a] * wx[:, b])
    return out


# Channels of the coarse H&E fields.
_SIGNED_DISTANCE, _CELLULARITY, _EOSIN_STRENGTH, _FIBRE_WEIGHTS = 0, 1, 2, slice(3, 6)
_FIBRE_COUNT = 3


def _tissue_fields(seed: int, width_um: float, height_um: float, fibre_angles: np.ndarray) -> np.ndarray:
    """Coarse fields on a 16 µm grid: signed distance to the tissue edge (µm, positive inside),
    cellularity (0–1), eosin strength (~1) and fibre-direction weights (summing to 1)."""
    gx = math.ceil(width_um / _FIELD_UM) + 2 * _FIELD_MARGIN + 1
    gy = math.ceil(height_um / _FIELD_UM) + 2 * _FIELD_MARGIN + 1
    x = ((np.arange(gx) - _FIELD_MARGIN) * _FIELD_UM)[None, :]
    y = ((np.arange(gy) - _FIELD_MARGIN) * _FIELD_UM)[:, None]

    # Blobs spread along the long side of the slide, inside it, as a section lies on glass.
    rng = _rng(seed, _STREAM_LAYOUT)
    long_um, short_um = max(width_um, height_um), min(width_um, height_um)
    n_blobs = int(rng.integers(1, 2 + min(2, int(short_um // 2500))))
    mean_radius = min(0.33 * short_um, 0.4 * long_um / n_blobs)
    distance = np.full((gy, gx), -np.inf)
    for index in range(n_blobs):
        along = long_um * (index + 0.5 + rng.uniform(-0.1, 0.1)) / n_blobs
        across = short_um * rng.uniform(0.42, 0.58)
        cx, cy = (along, across) if width_um >= height_um else (across, along)
        radius = mean_radius * rng.uniform(0.85, 1.05)
        distance = np.maximum(distance, _blob_distance(rng, x - cx, y - cy, radius))
    distance += 0.15 * mean_radius * _smooth_noise(seed, 0, (gy, gx), 0.4 * mean_radius)

    cellularity = np.clip((_smooth_noise(seed, 1, (gy, gx), 90.0) - 0.3) / 0.7, 0, 1)
    eosin = 1 + 0.12 * _smooth_noise(seed, 2, (gy, gx), 250.0)
    direction = math.pi * _smooth_noise(seed, 3, (gy, gx), 200.0)
    closeness = np.stack([np.cos(direction - angle) ** 8 for angle in fibre_angles]) + 1e-3
    weights = closeness / closeness.sum(axis=0)
    return np.concatenate([np.stack([distance, cellularity, eosin]), weights]).astype(np.float32)


def _blob_distance(rng, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Approximate signed distance (µm) to an elongated blob with a wavy outline."""
    turn = rng.uniform(0, math.pi)
    stretch = math.sqrt(rng.uniform(1.0, 1.6))
    u = (dx * math.cos(turn) + dy * math.sin(turn)) / stretch
    v = (-dx * math.sin(turn) + dy * math.cos(turn)) * stretch
    theta = np.arctan2(v, u)
    outline = np.ones_like(theta)
    for k in range(2, 6):
        outline += rng.uniform(0, 0.2) / k * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    return radius * outline - np.hypot(u, v)


# --------------------------------------------------------------------------- nuclei


@dataclass(frozen=True)
class _Nuclei:
    """Ellipses in µm (centre, full axes, angle in degrees, darkness 0–1), bucketed for window lookup."""

    x: np.ndarray
    y: np.ndarray
    major: np.ndarray
    minor: np.ndarray
    angle: np.ndarray
    darkness: np.ndarray
    bin_um: float
    bins_x: int
    bin_starts: np.ndarray  # nuclei are sorted by bin; bin b holds bin_starts[b]:bin_starts[b+1]

    def indices_in(self, x0_um: float, y0_um: float, x1_um: float, y1_um: float) -> np.ndarray:
        n_rows = (len(self.bin_starts) - 1) // self.bins_x
        c0, c1 = (int(np.clip(v // self.bin_um, 0, self.bins_x - 1)) for v in (x0_um, x1_um))
        r0, r1 = (int(np.clip(v // self.bin_um, 0, n_rows - 1)) for v in (y0_um, y1_um))
        spans = [np.arange(self.bin_starts[r * self.bins_x + c0], self.bin_starts[r * self.bins_x + c1 + 1])
                 for r in range(r0, r1 + 1)]
        return np.concatenate(spans) if spans else np.zeros(0, np.int64)


def _place_nuclei(seed: int, fields: np.ndarray, width_um: float, height_um: float, fibre_angles: np.ndarray) -> _Nuclei:
    """Nuclei as a thinned Poisson process: sparse spindle cells in stroma, crowded round ones in
    cellular regions, lymphocytes scattered everywhere."""
    blocks = [_nucleus_block(seed, by, bx) for by in range(math.ceil(height_um / _NUCLEUS_BLOCK_UM))
              for bx in range(math.ceil(width_um / _NUCLEUS_BLOCK_UM))]
    x, y, u = (np.concatenate(parts, axis=-1) for parts in zip(*blocks))
    on_slide = (x < width_um) & (y < height_um)
    x, y, u = x[on_slide], y[on_slide], u[:, on_slide]

    at = _sample_points(fields, x, y)
    cellular = at[_CELLULARITY]
    density = _NUCLEUS_DENSITY_STROMA + (_NUCLEUS_DENSITY_CELLULAR - _NUCLEUS_DENSITY_STROMA) * cellular
    keep = (at[_SIGNED_DISTANCE] > 0) & (u[0] < density / _NUCLEUS_DENSITY_CELLULAR)
    x, y, u, cellular, fibre_weights = x[keep], y[keep], u[:, keep], cellular[keep], at[_FIBRE_WEIGHTS][:, keep]

    is_tumour = u[1] < cellular
    is_lymphocyte = u[2] < 0.12
    major = np.where(is_tumour, 7.5 + 4.5 * u[3], 8.0 + 5.0 * u[3])
    minor = np.where(is_tumour, major / (1.0 + 0.5 * u[4]), 2.5 + 1.5 * u[4])
    fibre_angle = np.degrees(fibre_angles[np.argmax(fibre_weights, axis=0)])
    angle = np.where(is_tumour, 180.0 * u[5], fibre_angle + 24.0 * (u[5] - 0.5))
    darkness = np.where(is_tumour, 0.65 + 0.3 * u[6], 0.75 + 0.25 * u[6])
    lymph_size = 5.0 + 1.5 * u[7]
    major = np.where(is_lymphocyte, lymph_size, major)
    minor = np.where(is_lymphocyte, lymph_size * 0.92, minor)
    darkness = np.where(is_lymphocyte, 1.0, darkness)

    bin_um = 64.0
    bins_x = math.ceil(width_um / bin_um)
    bins = (y // bin_um).astype(np.int64) * bins_x + (x // bin_um).astype(np.int64)
    order = np.argsort(bins, kind="stable")
    n_bins = bins_x * math.ceil(height_um / bin_um)
    starts = np.searchsorted(bins[order], np.arange(n_bins + 1))
    columns = [a[order].astype(np.float32) for a in (x, y, major, minor, angle, darkness)]
    return _Nuclei(*columns, bin_um=bin_um, bins_x=bins_x, bin_starts=starts)


# --------------------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class _Artifact:
    """An artifact's footprint in µm: a stroke (pen, fold), a polygon (blur) or a disc (bubble)."""

    kind: str
    points: np.ndarray  # (n, 2) x, y µm; a disc has one point, its centre
    size_um: float  # stroke width or disc radius; unused for polygons
    ink: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def reach_um(self) -> float:
        return self.size_um if self.kind != "blur" else 0.0

    def touches(self, x0_um: float, y0_um: float, x1_um: float, y1_um: float) -> bool:
        (ax0, ay0), (ax1, ay1) = self.points.min(axis=0) - self.reach_um, self.points.max(axis=0) + self.reach_um
        return ax0 <= x1_um and x0_um <= ax1 and ay0 <= y1_um and y0_um <= ay1

    def draw(self, canvas: np.ndarray, origin_px: tuple[float, float], step_px: float, mpp: float,
             shrink_um: float = 0.0) -> None:
        """Paint the footprint (255 inside, anti-aliased edge) onto a canvas whose pixel (i, j)
        covers level-0 pixels origin + [j, j+1)·step, origin + [i, i+1)·step."""
        shift = 4  # cv2 fixed-point bits: sub-pixel placement
        scale = 1 / (mpp * step_px)
        pts = (self.points / mpp - np.asarray(origin_px)) / step_px - 0.5
        fixed = np.round(pts * (1 << shift)).astype(np.int32)
        if self.kind in ("pen", "fold"):
            thickness = max(1, round(self.size_um * scale))
            cv2.polylines(canvas, [fixed], False, 255, thickness, cv2.LINE_AA, shift)
        elif self.kind == "blur":
            cv2.fillPoly(canvas, [fixed], 255, cv2.LINE_AA, shift)
        else:
            radius = round((self.size_um - shrink_um) * scale * (1 << shift))
            if radius > 0:
                cv2.circle(canvas, tuple(int(v) for v in fixed[0]), radius, 255, -1, cv2.LINE_AA, shift)


def _place_artifacts(rng, kinds: tuple[str, ...], on_tissue: np.ndarray, deep_in_tissue: np.ndarray,
                     tissue_um2: float) -> tuple[_Artifact, ...]:
    """A few artifacts of each kind, centred on tissue, overlapping one another at most at the rims.

    Candidate centres are in µm; blur and folds, which show only on tissue, are centred deep in
    it when the tissue allows. Kinds take turns so each gets a place before any gets a second;
    on very small sections a kind may find no place. Sizes follow the tissue but stay at least 170 µm wide (a diagonal band that
    wide still holds an upright 112 µm square), so whole 224-px tiles at 0.5 µm/px fit inside
    every artifact.
    """
    per_kind = min(6, 1 + int(tissue_um2 / 2.5e6))
    scale = math.sqrt(tissue_um2)
    placed: list[tuple[np.ndarray, float]] = []
    artifacts = []
    for _ in range(per_kind):
        for kind in kinds:
            inside = deep_in_tissue if kind in ("blur", "fold") and len(deep_in_tissue) else on_tissue
            for attempt in range(60):
                centre = inside[rng.integers(len(inside))] + rng.uniform(-8, 8, 2)
                # Shrink on retries so a crowded section still gets every kind.
                artifact = _make_artifact(rng, kind, centre, scale * (1 - attempt / 80))
                extent = float(np.max(np.hypot(*(artifact.points - centre).T))) + artifact.reach_um / 2
                # Footprints may graze one another, never cover each other's middle.
                if all(np.hypot(*(centre - c)) > 0.8 * (extent + e) for c, e in placed):
                    placed.append((centre, extent))
                    artifacts.append(artifact)
                    break
    return tuple(artifacts)


def _node_positions_um(selected: np.ndarray) -> np.ndarray:
    """(x, y) in µm of the selected field nodes."""
    return (np.argwhere(selected)[:, ::-1] - _FIELD_MARGIN) * _FIELD_UM


def _make_artifact(rng, kind: str, centre: np.ndarray, tissue_scale_um: float) -> _Artifact:
    if kind == "pen":
        length = max(200.0, min(rng.uniform(600, 1400), 0.4 * tissue_scale_um))
        ink = _INKS[("green", "blue", "black")[rng.integers(3)]]
        return _Artifact(kind, _stroke(rng, centre, length, bend=0.25), rng.uniform(200, 300), ink)
    if kind == "fold":
        length = max(200.0, min(rng.uniform(500, 1200), 0.4 * tissue_scale_um))
        return _Artifact(kind, _stroke(rng, centre, length, bend=0.06), rng.uniform(170, 250))
    radius = max(140.0, min(rng.uniform(180, 360), 0.15 * tissue_scale_um))
    if kind == "blur":
        theta = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        wobble = 1 + sum(rng.uniform(0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * math.pi)) for k in (2, 3))
        outline = np.stack([np.cos(theta), np.sin(theta)], axis=1) * (radius * wobble)[:, None]
        return _Artifact(kind, centre + outline, 0.0)
    return _Artifact(kind, centre[None, :], radius)


def _stroke(rng, centre: np.ndarray, length: float, bend: float) -> np.ndarray:
    """A smooth random curve of the given length through ``centre``."""
    steps = 12
    heading = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, bend, steps))
    moves = np.stack([np.cos(heading), np.sin(heading)], axis=1) * (length / steps)
    points = np.concatenate([np.zeros((1, 2)), np.cumsum(moves, axis=0)])
    return points - points[steps // 2] + centre


# --------------------------------------------------------------------------- rendering


def _blur_margin_px(mpp: float) -> int:
    """Context a blurred window needs on each side: three standard deviations."""
    return math.ceil(3 * _BLUR_SIGMA_UM / mpp)


class _Renderer:
    """Renders any window of level 0 from the layout; stateless after construction."""

    def __init__(self, width, height, mpp, tile_size, pattern, stripe_period_um, textures, fields,
                 nuclei, artifacts):
        self.width, self.height, self.mpp, self.tile_size = width, height, mpp, tile_size
        self.pattern, self.stripe_period_um = pattern, stripe_period_um
        self.textures: dict[str, _Texture] = textures
        self.fields: np.ndarray | None = fields
        self.nuclei: _Nuclei | None = nuclei
        self.artifacts: tuple[_Artifact, ...] = artifacts
        self.blur_sigma_px = _BLUR_SIGMA_UM / mpp
        self.blur_margin_px = _blur_margin_px(mpp)

    @classmethod
    def build(cls, width, height, mpp, seed, pattern, stripe_period_um, kinds, tile_size) -> _Renderer:
        # Artifacts have their own random stream: the same seed gives the same tissue with or
        # without them.
        width_um, height_um = width * mpp, height * mpp
        pad = tile_size + 2 * _blur_margin_px(mpp)  # the largest window ever rendered
        fibre_angles = _rng(seed, _STREAM_FIBRES).uniform(0, math.pi) + np.arange(_FIBRE_COUNT) * math.pi / _FIBRE_COUNT
        rng = _rng(seed, _STREAM_TEXTURES)
        textures = {f"fibre{k}": _filtered_noise(rng, round(period / mpp), mpp, 7.0, 0.7, angle, pad)
                    for k, (period, angle) in enumerate(zip((233.0, 257.0, 281.0), fibre_angles))}
        textures["grain"] = _filtered_noise(rng, round(199.0 / mpp), mpp, 0.5, 0.5, 0.0, pad)
        textures["edge"] = _filtered_noise(rng, round(223.0 / mpp), mpp, 4.0, 4.0, 0.0, pad)
        textures["noise"] = _filtered_noise(rng, _NOISE_PERIOD_PX, mpp, 0.0, 0.0, 0.0, pad)

        if pattern == "he":
            fields = _tissue_fields(seed, width_um, height_um, fibre_angles)
            nuclei = _place_nuclei(seed, fields, width_um, height_um, fibre_angles)
            distance = fields[_SIGNED_DISTANCE]
        else:
            fields = nuclei = None
            # Stripes fill the slide: every field node over it counts as deep in tissue.
            distance = np.full((math.ceil(height_um / _FIELD_UM), math.ceil(width_um / _FIELD_UM)), np.inf)
            distance = np.pad(distance, _FIELD_MARGIN, constant_values=-np.inf)
        artifacts = ()
        if kinds and (distance > 0).any():
            on_tissue, deep = (_node_positions_um(distance > limit) for limit in (0.0, 60.0))
            tissue_um2 = float((distance > 0).sum()) * _FIELD_UM**2
            artifacts = _place_artifacts(_rng(seed, _STREAM_ARTIFACTS), kinds, on_tissue, deep, tissue_um2)
        return cls(width, height, mpp, tile_size, pattern, stripe_period_um, textures, fields, nuclei, artifacts)

    def artifact_labels(self, downsample: int) -> np.ndarray:
        """Label map, one cell per downsample² level-0 pixels, the cell centre deciding.

        Blur and folds change only tissue, so off the tissue their footprint is not labelled;
        ink and bubbles show on bare glass too.
        """
        labels = np.zeros((-(-self.height // downsample), -(-self.width // downsample)), np.uint8)
        on_tissue = self._tissue_at_cells(downsample, labels.shape)
        # Where footprints overlap, the uppermost wins: ink on the coverslip, then air bubbles
        # under it, then focus, then the section itself.
        for artifact in sorted(self.artifacts, key=lambda a: _LABEL_PRIORITY.index(a.kind)):
            canvas = np.zeros_like(labels)
            artifact.draw(canvas, (0.0, 0.0), downsample, self.mpp)
            covered = canvas >= 128
            if artifact.kind in ("blur", "fold"):
                covered &= on_tissue
            labels[covered] = ARTIFACT_TYPES.index(artifact.kind) + 1
        return labels

    def _tissue_at_cells(self, downsample: int, shape: tuple[int, int]) -> np.ndarray:
        if self.fields is None:
            return np.ones(shape, bool)
        cell_mpp = self.mpp * downsample
        rows_lo, rows = _spline_matrix(0, shape[0], cell_mpp, self.fields.shape[1])
        cols_lo, cols = _spline_matrix(0, shape[1], cell_mpp, self.fields.shape[2])
        nodes = self.fields[_SIGNED_DISTANCE : _SIGNED_DISTANCE + 1, rows_lo : rows_lo + rows.shape[1],
                            cols_lo : cols_lo + cols.shape[1]]
        return _separable_product(rows, nodes, cols)[0] > 0

    def render(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        transmission = self._transmission(x0, y0, w, h)
        noise = self.textures["noise"].window(x0, y0, w, h)[..., None] * _PIXEL_NOISE
        rgb = (_GLASS if transmission is None else transmission * _GLASS) + noise
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    # Transmission is the fraction of light let through, per RGB channel; None means bare glass.

    def _transmission(self, x0, y0, w, h) -> np.ndarray | None:
        box = self._box_um(x0, y0, w, h)
        present = [a for a in self.artifacts if a.touches(*box)]
        transmission = self._stained_section(x0, y0, w, h)
        if not present:
            return transmission
        if transmission is None:
            transmission = np.ones((h, w, 3), np.float32)
        for artifact in (a for a in present if a.kind == "blur"):
            self._apply_blur(transmission, artifact, x0, y0, w, h)
        for artifact in (a for a in present if a.kind == "bubble"):
            self._apply_bubble(transmission, artifact, x0, y0, w, h)
        for artifact in (a for a in present if a.kind == "pen"):
            mask = self._mask(artifact, x0, y0, w, h)
            strength = mask * (0.9 + 0.04 * self.textures["edge"].window(x0, y0, w, h))
            transmission *= np.exp(-strength[..., None] * np.asarray(artifact.ink, np.float32))
        return transmission

    def _stained_section(self, x0, y0, w, h) -> np.ndarray | None:
        """The section itself (with folds, which are part of it), before optics and ink."""
        stains = self._stripes(x0, w, h) if self.pattern == "stripes" else self._he_stains(x0, y0, w, h)
        if stains is None:
            return None
        hematoxylin, eosin = stains
        for artifact in self.artifacts:
            if artifact.kind == "fold" and artifact.touches(*self._box_um(x0, y0, w, h)):
                layers = 1 + _FOLD_EXTRA_LAYER * self._mask(artifact, x0, y0, w, h)
                hematoxylin, eosin = hematoxylin * layers, eosin * layers
        density = hematoxylin[..., None] * _HEMATOXYLIN + eosin[..., None] * _EOSIN
        return np.exp(-density, out=density)

    def _stripes(self, x0, w, h) -> tuple[np.ndarray, np.ndarray]:
        x_um = (x0 + np.arange(w, dtype=np.float64) + 0.5) * self.mpp
        wave = (0.5 + 0.5 * np.cos(2 * math.pi * x_um / self.stripe_period_um)).astype(np.float32)
        return np.broadcast_to(0.1 + 0.8 * wave, (h, w)), np.broadcast_to(0.5 - 0.25 * wave, (h, w))

    def _he_stains(self, x0, y0, w, h) -> tuple[np.ndarray, np.ndarray] | None:
        rows_lo, rows = _spline_matrix(y0, h, self.mpp, self.fields.shape[1])
        cols_lo, cols = _spline_matrix(x0, w, self.mpp, self.fields.shape[2])
        nodes = self.fields[:, rows_lo : rows_lo + rows.shape[1], cols_lo : cols_lo + cols.shape[1]]
        distance = _separable_product(rows, nodes[_SIGNED_DISTANCE : _SIGNED_DISTANCE + 1], cols)[0]
        if distance.max() < -6 * _EDGE_RAGGEDNESS_UM:
            return None
        distance += _EDGE_RAGGEDNESS_UM * self.textures["edge"].window(x0, y0, w, h)
        tissue = np.clip(0.5 + distance / _EDGE_SOFTNESS_UM, 0, 1)
        fields = _separable_product(rows, nodes, cols)
        cellular, eosin_strength = fields[_CELLULARITY], fields[_EOSIN_STRENGTH]

        fibres = sum(wk * self.textures[f"fibre{k}"].window(x0, y0, w, h)
                     for k, wk in enumerate(fields[_FIBRE_WEIGHTS]))
        collagen = np.clip(0.6 + 0.32 * fibres, 0, 1)  # negative tails become white clefts
        grain = self.textures["grain"].window(x0, y0, w, h)
        nuclei = self._nuclei(x0, y0, w, h)
        eosin = tissue * eosin_strength * (0.55 * collagen * (1 - 0.6 * cellular) + cellular * (0.24 + 0.05 * grain))
        eosin *= 1 - 0.4 * nuclei
        hematoxylin = tissue * (0.04 + cellular * (0.12 + 0.04 * grain) + nuclei * (1.05 + 0.2 * grain))
        return hematoxylin, eosin

    def _nuclei(self, x0, y0, w, h) -> np.ndarray:
        canvas = np.zeros((h, w), np.uint8)
        reach = 8.0  # µm: half the longest nucleus
        x0_um, y0_um, x1_um, y1_um = self._box_um(x0, y0, w, h)
        nuclei = self.nuclei
        shift = 4
        scale = (1 << shift) / self.mpp
        for i in nuclei.indices_in(x0_um - reach, y0_um - reach, x1_um + reach, y1_um + reach):
            centre = (round((nuclei.x[i] / self.mpp - x0 - 0.5) * (1 << shift)),
                      round((nuclei.y[i] / self.mpp - y0 - 0.5) * (1 << shift)))
            axes = (round(nuclei.major[i] * 0.5 * scale), round(nuclei.minor[i] * 0.5 * scale))
            cv2.ellipse(canvas, centre, axes, float(nuclei.angle[i]), 0, 360,
                        int(255 * nuclei.darkness[i]), -1, cv2.LINE_AA, shift)
        return canvas.astype(np.float32) * np.float32(1 / 255)

    def _apply_blur(self, transmission, artifact, x0, y0, w, h) -> None:
        m = self.blur_margin_px
        around = self._stained_section(x0 - m, y0 - m, w + 2 * m, h + 2 * m)
        if around is None:
            return  # blurring bare glass changes nothing
        blurred = cv2.GaussianBlur(around, (0, 0), self.blur_sigma_px)[m : m + h, m : m + w]
        transmission += self._mask(artifact, x0, y0, w, h)[..., None] * (blurred - transmission)

    def _apply_bubble(self, transmission, artifact, x0, y0, w, h) -> None:
        """Air under the coverslip: a dark refracting edge, a bright ring, a hazy grey inside."""
        disc = self._mask(artifact, x0, y0, w, h)
        inner = self._mask(artifact, x0, y0, w, h, shrink_um=_BUBBLE_DARK_RIM_UM)
        core = self._mask(artifact, x0, y0, w, h, shrink_um=_BUBBLE_DARK_RIM_UM + _BUBBLE_BRIGHT_RIM_UM)
        grey = transmission.mean(axis=2, keepdims=True)
        haze = 0.5 * grey + 0.42
        transmission += (0.75 * core)[..., None] * (haze - transmission)
        transmission += (0.9 * (inner - core))[..., None] * (1.0 - transmission)
        transmission *= 1 - 0.6 * (disc - inner)[..., None]

    def _mask(self, artifact, x0, y0, w, h, shrink_um=0.0) -> np.ndarray:
        canvas = np.zeros((h, w), np.uint8)
        artifact.draw(canvas, (x0, y0), 1.0, self.mpp, shrink_um)
        return canvas.astype(np.float32) * np.float32(1 / 255)

    def _box_um(self, x0, y0, w, h) -> tuple[float, float, float, float]:
        return x0 * self.mpp, y0 * self.mpp, (x0 + w) * self.mpp, (y0 + h) * self.mpp
