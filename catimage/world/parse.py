"""Prompt -> `SceneSpec`: read back what a world prompt asks for (the verifier's view; never the router's).

Lenient on purpose, so that prompts written by someone else in the world's vocabulary parse too: it
finds object phrases ("two small blue squares", "a big red circle", "3 green triangles"), reads the
relation phrases between two neighbouring object phrases ("to the left of", "above", "below and to
the left of" ...), a position phrase after an object, before any relation ("in the top left
corner", "on the right" ...) and a background phrase anywhere ("on a white background"); other
words are ignored. Counts above three ("four red circles") are an error, not a plural read as two.
"""

from __future__ import annotations

import re

from catimage.errors import CatimageError
from catimage.world.scene import BACKGROUNDS, COLOURS, MAX_COUNT, SHAPES, ObjectSpec, Relation, SceneSpec


class WorldParseError(CatimageError):
    """A prompt that names no object of the scene world (no colour + shape)."""


_COUNT = {"a": 1, "an": 1, "one": 1, "1": 1, "single": 1, "two": 2, "2": 2, "a pair of": 2, "pair of": 2,
          "three": 3, "3": 3}
# counts the world cannot hold: read so that they are an error, not a plural read as "two"
_COUNT.update({w: n for n, w in enumerate(("four", "five", "six", "seven", "eight", "nine", "ten"), start=4)})
_COUNT.update({str(n): n for n in range(4, 11)})
_SIZE = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_COLOUR_SYNONYMS = {"violet": "purple", "grey": "gray"}
_SHAPE = {s: s for s in SHAPES}

_COUNT_RE = "|".join(sorted((re.escape(k) for k in _COUNT), key=len, reverse=True))
_SIZE_RE = "|".join(_SIZE)
_COLOUR_RE = "|".join(list(COLOURS) + [k for k, v in _COLOUR_SYNONYMS.items() if v in COLOURS])
_OBJECT = re.compile(
    rf"\b(?:(?P<count>{_COUNT_RE})\s+)?(?:(?P<size1>{_SIZE_RE})\s+)?(?P<colour>{_COLOUR_RE})\s+"
    rf"(?:(?P<size2>{_SIZE_RE})\s+)?(?P<shape>{'|'.join(SHAPES)})(?P<plural>e?s)?\b"
)
_RELATIONS = [
    (re.compile(r"\b(?:to\s+the\s+|on\s+the\s+)?left\s+(?:side\s+)?of\b"), "left of"),
    (re.compile(r"\b(?:to\s+the\s+|on\s+the\s+)?right\s+(?:side\s+)?of\b"), "right of"),
    (re.compile(r"\b(?:above|over|on\s+top\s+of)\b"), "above"),
    (re.compile(r"\b(?:below|under|underneath|beneath)\b"), "below"),
]
_POSITIONS = [
    (re.compile(r"\b(?:top|upper)[\s-]+left\b"), "top left"),
    (re.compile(r"\b(?:top|upper)[\s-]+right\b"), "top right"),
    (re.compile(r"\b(?:bottom|lower)[\s-]+left\b"), "bottom left"),
    (re.compile(r"\b(?:bottom|lower)[\s-]+right\b"), "bottom right"),
    (re.compile(r"\b(?:center|centre|middle)\b"), "center"),
    (re.compile(r"\b(?:top|upper)\b"), "top"),
    (re.compile(r"\b(?:bottom|lower)\b"), "bottom"),
    (re.compile(r"\bleft\b"), "left"),
    (re.compile(r"\bright\b"), "right"),
]
_BACKGROUND = re.compile(rf"\b(?P<bg>{'|'.join(list(BACKGROUNDS) + ['grey'])})\s+background\b")


def _normalise(prompt: str) -> str:
    return " ".join(prompt.lower().replace(",", " , ").split())


def _position(segment: str) -> str | None:
    for pattern, name in _POSITIONS:
        if pattern.search(segment):
            return name
    return None


def _relations(segment: str) -> list[tuple[int, str]]:
    """The relation phrases in `segment` ("below and to the left of": two), as (start, name) in order."""
    return sorted((m.start(), name) for pattern, name in _RELATIONS for m in [pattern.search(segment)] if m)


def parse(prompt: str) -> SceneSpec:
    """The spec a world prompt asks for; `WorldParseError` if it names no coloured shape."""
    text = _normalise(prompt)
    background = None
    bg = _BACKGROUND.search(text)
    if bg:
        background = _COLOUR_SYNONYMS.get(bg["bg"], bg["bg"])
        text = text[: bg.start()] + " " * (bg.end() - bg.start()) + text[bg.end() :]
    matches = list(_OBJECT.finditer(text))
    if not matches:
        raise WorldParseError(
            f"{prompt!r} names no object of the scene world (a colour from {list(COLOURS)} followed by a "
            f"shape from {list(SHAPES)}); scene_score only scores scene-world prompts"
        )
    segments = [text[m.end() : (matches[i + 1].start() if i + 1 < len(matches) else len(text))]
                for i, m in enumerate(matches)]
    objects: list[ObjectSpec] = []
    relations: list[Relation] = []
    for i, m in enumerate(matches):
        count = _COUNT.get(m["count"] or "", 2 if m["plural"] else 1)
        if count > MAX_COUNT:
            raise WorldParseError(
                f"{prompt!r} asks for {m['count']} {m['colour']} {m['shape']}s; the scene world draws at most "
                f"{MAX_COUNT} of a kind"
            )
        size = _SIZE.get(m["size1"] or m["size2"] or "")
        colour = _COLOUR_SYNONYMS.get(m["colour"], m["colour"])
        seg = segments[i]
        rels = _relations(seg) if i + 1 < len(matches) else []
        if rels:
            relations += [Relation(i, name, i + 1) for _, name in rels]
            seg = seg[: rels[0][0]]  # a position may come before the relation ("on the left, above ...")
        objects.append(ObjectSpec(_SHAPE[m["shape"]], colour, size, count, _position(seg)))
    try:
        return SceneSpec(tuple(objects), tuple(relations), background)
    except ValueError as err:
        raise WorldParseError(f"{prompt!r}: {err}") from None
