"""The 15 CIFAR-10-C corruptions as functions of a batch of uint8 images, after the definitions
in `make_cifar_c.py` (hendrycks/robustness) with its CIFAR constants (`PARAMETERS`), on
numpy/scipy/Pillow; `pipeline.corruptions` says where each differs from the reference.

Each function takes `(images, parameter, rng)`: uint8 `(B, 32, 32, 3)` images, one severity's
entry of `PARAMETERS`, and the `numpy.random.Generator` every draw comes from; it returns uint8
images, or floats in [0, 1] that the caller clips and truncates to uint8 as `np.uint8` does in
the reference. Draws are made for the whole batch at once, so no function loops over images in
Python except where Pillow owns the operation (JPEG, the box resampling of pixelate).
"""

from __future__ import annotations

import io
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

# make_cifar_c.py's CIFAR constants, severity 1 first.
PARAMETERS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": tuple(tuple(np.arange(1, top, 0.01)) for top in (1.06, 1.11, 1.16, 1.21, 1.26)),
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    # (alpha, sigma, affine jitter) as fractions of the 32-pixel side, as the reference writes them
    "elastic_transform": tuple(
        (32 * alpha, 32 * sigma, 32 * jitter)
        for alpha, sigma, jitter in (
            (0, 0, 0.08),
            (0.05, 0.2, 0.07),
            (0.08, 0.06, 0.06),
            (0.1, 0.04, 0.05),
            (0.1, 0.03, 0.03),
        )
    ),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
}

# The five frost photographs make_cifar_c.py draws from, at its 0.2 scale: mean RGB and the std
# of all their values, measured once from the images in the imagecorruptions 1.1.2 wheel.
FROST_STATS = (
    ((77.7, 149.1, 165.7), 41.9),
    ((200.8, 205.4, 214.5), 19.0),
    ((200.8, 205.4, 214.5), 19.0),
    ((137.6, 152.8, 165.2), 24.3),
    ((112.4, 123.4, 134.7), 36.2),
)
FROST_SIZE = 96  # side of each procedural frost texture; crops of 32 are drawn from it


# --------------------------------------------------------------------------- helpers


def _float(images: np.ndarray) -> np.ndarray:
    return images / 255.0  # (B, 32, 32, 3) float64 in [0, 1]


def _gaussian(x: np.ndarray, sigma: float, *, mode: str = "nearest", truncate=4.0) -> np.ndarray:
    """scikit-image's `gaussian` on each image of a batch (its defaults: nearest border)."""
    sigmas = (0, sigma, sigma) + (0,) * (x.ndim - 3)
    return ndimage.gaussian_filter(x, sigma=sigmas, mode=mode, truncate=truncate)


def _zoom_matrix(size: int, factor: float) -> np.ndarray:
    """scipy's order-1 `zoom` of one axis of length `size` by `factor`, as a matrix."""
    out = int(round(size * factor))
    position = np.arange(out) * ((size - 1) / (out - 1))
    low = np.minimum(np.floor(position).astype(int), size - 2)
    weight = position - low
    matrix = np.zeros((out, size))
    matrix[np.arange(out), low] = 1 - weight
    matrix[np.arange(out), low + 1] += weight
    return matrix


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom the centre of each `(B, 32, 32, ...)` image by `factor`, keeping 32 x 32."""
    side = x.shape[1]
    crop = int(np.ceil(side / factor))
    top = (side - crop) // 2
    matrix = _zoom_matrix(crop, factor)
    trim = (len(matrix) - side) // 2
    matrix = matrix[trim : trim + side].astype(x.dtype)
    window = x[:, top : top + crop, top : top + crop]
    rows = np.moveaxis(np.tensordot(matrix, window, axes=(1, 1)), 0, 1)  # (B, 32, crop, ...)
    return np.moveaxis(np.tensordot(matrix, rows, axes=(1, 2)), 0, 2)  # (B, 32, 32, ...)


def _motion_blur(x: np.ndarray, radius: int, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick's MotionBlurImage on `(B, H, W, C)` values in [0, 255], rounded to uint8:
    a one-sided Gaussian along each image's angle (degrees), edge pixels repeated."""
    width = 2 * radius + 1
    kernel = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    radians = np.deg2rad(angles)
    height, breadth = x.shape[1:3]
    batch = np.arange(len(x))[:, None, None]
    blurred = np.zeros(x.shape, dtype=np.float64)
    for step, weight in enumerate(kernel):
        row_offset = np.ceil(step * np.sin(radians) - 0.5).astype(int)  # (B,)
        col_offset = np.ceil(step * np.cos(radians) - 0.5).astype(int)
        rows = np.clip(np.arange(height) + row_offset[:, None], 0, height - 1)
        cols = np.clip(np.arange(breadth) + col_offset[:, None], 0, breadth - 1)
        blurred += weight * x[batch, rows[:, :, None], cols[:, None, :]]
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


def _plasma_fractal(rng: np.random.Generator, count: int, *, decay: float, size=32) -> np.ndarray:
    """make_cifar_c.py's diamond-square height maps, `(count, size, size)` in [0, 1]."""
    maps = np.zeros((count, size, size))
    step, wibble = size, 100.0

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = maps[:, 0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        maps[:, half:size:step, half:size:step] = wibbled_mean(square)
        centres = maps[:, half:size:step, half:size:step]
        corners = maps[:, 0:size:step, 0:size:step]
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        maps[:, 0:size:step, half:size:step] = wibbled_mean(left)
        top = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        maps[:, half:size:step, 0:size:step] = wibbled_mean(top)
        step //= 2
        wibble /= decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def _per_image(images: np.ndarray, transform) -> np.ndarray:
    """Apply a Pillow `transform` to each image: for the codecs and resamplers Pillow owns."""
    return np.stack([np.asarray(transform(Image.fromarray(image))) for image in images])


# --------------------------------------------------------------------------- the corruptions


def _gaussian_noise(images, scale, rng):
    x = _float(images)
    return x + rng.normal(size=x.shape, scale=scale)


def _shot_noise(images, photons, rng):
    return rng.poisson(_float(images) * photons) / photons


def _impulse_noise(images, amount, rng):
    x = _float(images)
    flipped = rng.random(x.shape) <= amount
    salted = rng.random(x.shape) <= 0.5
    x[flipped & salted] = 1.0
    x[flipped & ~salted] = 0.0
    return x


def _defocus_blur(images, parameters, rng):
    radius, alias_blur = parameters
    axis = np.arange(-8, 9)
    disk = (axis[:, None] ** 2 + axis[None, :] ** 2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    # OpenCV's 3x3 GaussianBlur of the disk: anti-aliasing, as make_cifar_c.py's disk()
    taps = np.exp(-(np.arange(-1, 2) ** 2) / (2 * alias_blur**2))
    taps /= taps.sum()
    kernel = ndimage.correlate1d(disk, taps, axis=0, mode="mirror")
    kernel = ndimage.correlate1d(kernel, taps, axis=1, mode="mirror")
    keep = np.nonzero(kernel.max(axis=0) > 1e-12)[0]  # the rest is exp(-50) and smaller
    kernel = kernel[keep[0] : keep[-1] + 1, keep[0] : keep[-1] + 1]
    return ndimage.correlate(_float(images), kernel[None, :, :, None], mode="mirror")


def _glass_blur(images, parameters, rng):
    sigma, delta, iterations = parameters
    x = (_gaussian(_float(images), sigma) * 255).astype(np.uint8)
    batch = np.arange(len(x))
    for _ in range(iterations):
        for row in range(32 - delta, delta, -1):
            for col in range(32 - delta, delta, -1):
                shift = rng.integers(-delta, delta, size=(len(x), 2))  # (dx, dy), high exclusive
                # make_cifar_c.py's `a, b = b, a` on numpy views copies b into a and keeps b
                x[:, row, col] = x[batch, row + shift[:, 1], col + shift[:, 0]]
    return _gaussian(x / 255.0, sigma)


def _motion_blur_corruption(images, parameters, rng):
    radius, sigma = parameters
    angles = rng.uniform(-45, 45, size=len(images))
    return _motion_blur(images.astype(np.float64), radius, sigma, angles)


def _zoom_blur(images, factors, rng):
    x = _float(images).astype(np.float32)
    total = np.zeros_like(x)
    for factor in factors:
        total += _clipped_zoom(x, factor)
    return (x + total) / (len(factors) + 1)


def _snow(images, parameters, rng):
    mean, std, zoom, threshold, radius, sigma, keep = parameters
    x = _float(images).astype(np.float32)
    layer = rng.normal(size=x.shape[:3], loc=mean, scale=std)
    layer = _clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)
    angles = rng.uniform(-135, -45, size=len(x))
    layer = _motion_blur(layer[..., None].astype(np.float64), radius, sigma, angles) / 255.0
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # OpenCV's RGB2GRAY
    x = keep * x + (1 - keep) * np.maximum(x, grey[..., None] * 1.5 + 0.5)
    return x + layer + np.rot90(layer, k=2, axes=(1, 2))


@lru_cache(maxsize=1)
def frost_textures() -> np.ndarray:
    """Five `(96, 96, 3)` uint8 textures standing in for the frost photographs: fractal noise
    plus blurred needle-like strokes, each scaled to one photograph's mean colour and contrast
    (FROST_STATS). Fixed, like the photographs: drawn from a generator of their own."""
    rng = np.random.default_rng(zlib.crc32(b"frost"))
    size = FROST_SIZE
    textures = []
    for mean, std in FROST_STATS:
        noise = sum(
            ndimage.zoom(rng.standard_normal((size // cell,) * 2), cell, order=1) / cell**0.5
            for cell in (2, 4, 8, 16)
        )
        needles = np.zeros((size, size))
        count = 400
        centres = rng.uniform(0, size, size=(count, 2))
        angles = rng.uniform(0, np.pi, size=count)
        lengths = rng.uniform(2, 10, size=count)
        steps = np.linspace(-0.5, 0.5, 16)
        rows = centres[:, :1] + steps * lengths[:, None] * np.sin(angles)[:, None]
        cols = centres[:, 1:] + steps * lengths[:, None] * np.cos(angles)[:, None]
        np.add.at(needles, (rows.astype(int) % size, cols.astype(int) % size), 1.0)
        grey = noise / noise.std() + 2 * ndimage.gaussian_filter(needles, 0.7, mode="wrap")
        grey = (grey - grey.mean()) / grey.std()
        textures.append(np.asarray(mean) + std * grey[..., None])
    return np.clip(np.stack(textures), 0, 255).astype(np.uint8)  # as the files are read


def _frost(images, parameters, rng):
    keep, amount = parameters
    textures = frost_textures()
    pick = rng.integers(len(FROST_STATS), size=len(images))
    top = rng.integers(0, FROST_SIZE - 32, size=(len(images), 2))
    rows = top[:, :1] + np.arange(32)
    cols = top[:, 1:] + np.arange(32)
    crops = textures[pick[:, None, None], rows[:, :, None], cols[:, None, :]]
    return np.clip(keep * images + amount * crops, 0, 255).astype(np.uint8)


def _fog(images, parameters, rng):
    amount, decay = parameters
    x = _float(images)
    brightest = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + amount * _plasma_fractal(rng, len(x), decay=decay)[..., None]
    return x * brightest / (brightest + amount)


def _brightness(images, shift, rng):
    # rgb -> hsv, value + shift, -> rgb rescales each pixel by new value / old value; black
    # pixels (no hue, no saturation) become grey at the new value
    x = _float(images)
    value = x.max(axis=-1, keepdims=True)
    brighter = np.clip(value + shift, 0, 1)
    return np.where(value > 0, x * brighter / np.where(value > 0, value, 1), brighter)


def _contrast(images, factor, rng):
    x = _float(images)
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * factor + means


def _elastic_transform(images, parameters, rng):
    alpha, sigma, jitter = parameters
    x = _float(images).astype(np.float32)
    count = len(x)
    # a random affine: three points moved by up to `jitter` pixels, as OpenCV's
    # getAffineTransform + warpAffine (reflect-101 border = scipy's "mirror")
    source = np.array([[26, 26], [26, 6], [6, 6]], dtype=np.float64)  # (x, y)
    moved = source + rng.uniform(-jitter, jitter, size=(count, 3, 2)).astype(np.float32)
    forward = np.linalg.solve(np.hstack([source, np.ones((3, 1))]), moved)  # (B, 3, 2)
    affine = np.concatenate([forward, np.tile([[0.0], [0.0], [1.0]], (count, 1, 1))], axis=2)
    inverse = np.linalg.inv(np.swapaxes(affine, 1, 2))  # (B, 3, 3): output -> input
    rows, cols = np.meshgrid(np.arange(32.0), np.arange(32.0), indexing="ij")
    points = np.stack([cols, rows, np.ones_like(rows)])  # (3, 32, 32)
    mapped = np.einsum("bij,jhw->bihw", inverse, points)
    x = _sample(x, mapped[:, 1], mapped[:, 0], mode="mirror")
    dx = _gaussian(rng.uniform(-1, 1, size=(count, 32, 32)), sigma, mode="reflect", truncate=3)
    dy = _gaussian(rng.uniform(-1, 1, size=(count, 32, 32)), sigma, mode="reflect", truncate=3)
    return _sample(x, rows + alpha * dy, cols + alpha * dx, mode="reflect")


def _sample(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, *, mode: str) -> np.ndarray:
    """Bilinear samples of each `(B, H, W, C)` image at its own `(B, H, W)` rows and cols."""
    shape = x.shape
    batch = np.broadcast_to(np.arange(shape[0], dtype=np.float64)[:, None, None, None], shape)
    channel = np.broadcast_to(np.arange(shape[3], dtype=np.float64), shape)
    rows = np.broadcast_to(rows[..., None], shape)
    cols = np.broadcast_to(cols[..., None], shape)
    coordinates = np.stack([batch, rows, cols, channel])
    return ndimage.map_coordinates(x, coordinates, order=1, mode=mode)


def _pixelate(images, factor, rng):
    side = int(32 * factor)
    return _per_image(
        images,
        lambda image: image.resize((side, side), Image.Resampling.BOX).resize(
            (32, 32), Image.Resampling.BOX
        ),
    )


def _jpeg_compression(images, quality, rng):
    def compress(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return Image.open(buffer)

    return _per_image(images, compress)


FUNCTIONS = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_corruption,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}
