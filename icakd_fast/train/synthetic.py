"""``synthetic``: a procedurally generated, file-free image classification task.

Each class is a combination of three attributes -- shape x colour x texture -- so classes share
attributes and the category structure is non-trivial (a "red striped circle" is closer to a "red
solid circle" than to a "blue checkered cross"). Every image draws its class object at a random
position, scale and rotation on a cluttered background (smooth colour field, noise, line
segments and smaller distractor shapes of random attributes), so the evidence for the class is
spatially localised and class activation maps matter.

Everything is deterministic given ``seed``: the class definitions, the train split (``seed``'s
stream 1) and the test split (stream 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SHAPES", "COLOURS", "TEXTURES", "SyntheticShapes", "class_attributes", "render_batch"]

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (0.92, 0.16, 0.14),
    "green": (0.18, 0.78, 0.22),
    "blue": (0.16, 0.30, 0.95),
    "yellow": (0.95, 0.86, 0.15),
    "magenta": (0.86, 0.20, 0.82),
    "cyan": (0.15, 0.82, 0.88),
}
TEXTURES = ("solid", "striped", "checkered", "outline")
_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def class_attributes(num_classes: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Distinct (shape, colour, texture) index triples, one per class, chosen from ``seed``."""
    total = len(SHAPES) * len(COLOURS) * len(TEXTURES)
    if not 2 <= num_classes <= total:
        raise ValueError(f"synthetic num_classes must be in [2, {total}], got {num_classes}")
    rng = np.random.default_rng([seed, 0])
    combos = rng.permutation(total)[:num_classes]
    nc, nt = len(COLOURS), len(TEXTURES)
    return [(int(i) // (nc * nt), (int(i) // nt) % nc, int(i) % nt) for i in combos]


def class_name(attrs: tuple[int, int, int]) -> str:
    s, c, t = attrs
    return f"{_COLOUR_NAMES[c]} {TEXTURES[t]} {SHAPES[s]}"


def _signed_distance(shape: int, qx: np.ndarray, qy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) of a shape of radius ``r`` in local coords."""
    name = SHAPES[shape]
    if name == "circle":
        return np.hypot(qx, qy) - r
    if name == "ring":
        return np.abs(np.hypot(qx, qy) - 0.72 * r) - 0.28 * r
    if name == "square":
        return np.maximum(np.abs(qx), np.abs(qy)) - 0.8 * r
    if name == "diamond":
        return (np.abs(qx) + np.abs(qy) - r) / math.sqrt(2.0)
    if name == "triangle":
        d = None
        for k in range(3):
            a = math.pi / 2 + 2 * math.pi * k / 3
            e = qx * math.cos(a) + qy * math.sin(a) - 0.5 * r
            d = e if d is None else np.maximum(d, e)
        return d
    if name == "cross":
        arm = 0.32 * r
        bar1 = np.maximum(np.abs(qx) - r, np.abs(qy) - arm)
        bar2 = np.maximum(np.abs(qx) - arm, np.abs(qy) - r)
        return np.minimum(bar1, bar2)
    raise AssertionError(name)


def _draw(img, xs, ys, shape, colour, texture, cx, cy, r, theta, phase):
    """Alpha-composite one textured shape onto ``img`` [H, W, 3] in place."""
    c, s = math.cos(theta), math.sin(theta)
    dx, dy = xs - cx, ys - cy
    qx, qy = c * dx + s * dy, -s * dx + c * dy
    d = _signed_distance(shape, qx, qy, r)
    alpha = np.clip(0.5 - d, 0.0, 1.0)
    period = max(2.5, 0.55 * r)
    name = TEXTURES[texture]
    if name == "solid":
        shade = np.ones_like(d)
    elif name == "striped":
        shade = np.where(np.sin((qx + phase) * (2 * math.pi / period)) > 0, 1.0, 0.25)
    elif name == "checkered":
        w = 2 * math.pi / (1.2 * period)
        shade = np.where(np.sin((qx + phase) * w) * np.sin((qy + phase) * w) > 0, 1.0, 0.25)
    else:  # outline: a bright rim, dark interior
        shade = np.where(d > -max(1.2, 0.22 * r), 1.0, 0.12)
    fill = shade[..., None] * colour[None, None, :]
    img *= 1.0 - alpha[..., None]
    img += alpha[..., None] * fill


def render_image(rng: np.random.Generator, attrs: tuple[int, int, int], size: int) -> np.ndarray:
    """One float32 image [H, W, 3] in [0, 1] showing an object of class ``attrs`` in clutter."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # background: a smooth low-frequency colour field + a gradient
    base = rng.uniform(0.25, 0.6, size=3).astype(np.float32)
    coarse = rng.normal(0.0, 0.12, size=(4, 4, 3)).astype(np.float32)
    rep = int(math.ceil(size / 4))
    field = np.kron(coarse, np.ones((rep, rep, 1), np.float32))[:size, :size]
    g = rng.normal(0.0, 0.15, size=(2, 3)).astype(np.float32)
    img = base + field + (xs[..., None] / size - 0.5) * g[0] + (ys[..., None] / size - 0.5) * g[1]
    img = np.ascontiguousarray(img, dtype=np.float32)
    # clutter: a few line segments
    for _ in range(rng.integers(1, 4)):
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        vx, vy = x1 - x0, y1 - y0
        t = np.clip(((xs - x0) * vx + (ys - y0) * vy) / (vx * vx + vy * vy + 1e-6), 0, 1)
        dist = np.hypot(xs - (x0 + t * vx), ys - (y0 + t * vy))
        a = np.clip(1.0 - dist, 0, 1)[..., None] * rng.uniform(0.4, 0.9)
        img = img * (1 - a) + a * rng.uniform(0, 1, size=3).astype(np.float32)
    # distractors: small shapes with random attributes (smaller than any class object)
    for _ in range(rng.integers(2, 6)):
        r = rng.uniform(0.07, 0.12) * size
        colour = _PALETTE[rng.integers(len(_PALETTE))] * rng.uniform(0.6, 1.0)
        _draw(img, xs, ys, int(rng.integers(len(SHAPES))), colour, int(rng.integers(len(TEXTURES))),
              rng.uniform(0, size), rng.uniform(0, size), r, rng.uniform(0, 2 * math.pi), rng.uniform(0, 4))
    # the class object: random position (fully inside), scale and rotation; colour jitter
    shape, colour_i, texture = attrs
    r = rng.uniform(0.2, 0.32) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    colour = np.clip(_PALETTE[colour_i] + rng.normal(0, 0.06, size=3), 0, 1).astype(np.float32)
    colour = colour * rng.uniform(0.75, 1.05)
    _draw(img, xs, ys, shape, colour, texture, cx, cy, r, rng.uniform(0, 2 * math.pi), rng.uniform(0, 4))
    img += rng.normal(0.0, 0.04, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def render_batch(num: int, class_attrs, size: int, seed: int, stream: int):
    """``num`` images (uint8 [N, 3, H, W]) with balanced, shuffled labels (int64 [N])."""
    rng = np.random.default_rng([seed, stream])
    k = len(class_attrs)
    labels = rng.permutation(np.arange(num) % k)
    out = np.empty((num, size, size, 3), dtype=np.uint8)
    for i, y in enumerate(labels):
        out[i] = np.round(render_image(rng, class_attrs[int(y)], size) * 255.0).astype(np.uint8)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels.astype(np.int64))


@dataclass
class _Split:
    images: torch.Tensor
    labels: torch.Tensor


class SyntheticShapes(Dataset):
    """The ``synthetic`` dataset. ``train=True`` applies flip + pad-and-crop augmentation.

    Images are rendered once at construction (a few seconds for ten thousand 32x32 images) and
    returned as normalised float32 tensors [3, H, W] with int64 labels.
    """

    def __init__(self, *, train: bool, num_classes: int = 10, image_size: int = 32,
                 per_class: int = 500, seed: int = 0, augment: bool | None = None) -> None:
        if image_size < 8:
            raise ValueError(f"synthetic image_size must be >= 8, got {image_size}")
        if per_class < 1:
            raise ValueError(f"synthetic per_class must be >= 1, got {per_class}")
        self.num_classes = num_classes
        self.image_size = image_size
        self.attributes = class_attributes(num_classes, seed)
        self.classes = [class_name(a) for a in self.attributes]
        self.train = train
        self.augment = train if augment is None else augment
        self.images, self.targets = render_batch(per_class * num_classes, self.attributes, image_size,
                                                 seed, 1 if train else 2)
        self._mean = torch.tensor(MEAN).view(3, 1, 1)
        self._std = torch.tensor(STD).view(3, 1, 1)
        self.pad = max(1, image_size // 16)

    def __len__(self) -> int:
        return int(self.targets.numel())

    def __getitem__(self, i: int):
        x = self.images[i].float().div_(255.0)
        if self.augment:
            # global torch RNG: deterministic under torch.manual_seed / DataLoader worker seeding
            flip, dx, dy = torch.randint(0, 2 * self.pad + 1, (3,)).tolist()
            if flip % 2:
                x = x.flip(-1)
            p = self.pad
            x = torch.nn.functional.pad(x[None], (p, p, p, p), mode="replicate")[0]
            x = x[:, dy:dy + self.image_size, dx:dx + self.image_size]
        return (x - self._mean) / self._std, int(self.targets[i])
