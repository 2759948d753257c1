"""Ground-truth pictures of scenes: flat-coloured shapes on a plain background.

Drawn with PIL at `SUPERSAMPLE` times the target size and reduced with a box filter, so edges are
anti-aliased the same way at every canvas size. A circle fills its extent box, a square is the box,
a triangle points up with its base on the box's bottom edge.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from catimage.world.scene import BACKGROUNDS, COLOURS, Scene

SUPERSAMPLE = 4


def render(scene: Scene, size: int = 32) -> Image.Image:
    """An RGB image of `scene`, `size` x `size` pixels."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        half = obj.extent * big / 2
        x, y = obj.cx * big, obj.cy * big
        box = (x - half, y - half, x + half, y + half)
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        elif obj.shape == "triangle":
            draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=colour)
        else:
            raise ValueError(f"cannot draw shape {obj.shape!r}")
    return image.resize((size, size), Image.Resampling.BOX)


def render_array(scene: Scene, size: int = 32) -> np.ndarray:
    """`render` as a (size, size, 3) uint8 array."""
    return np.asarray(render(scene, size), dtype=np.uint8)
