"""The scene world's vocabulary and its two levels of description.

A `SceneSpec` is what a prompt asks for (object groups with optional size / count / position, pairwise
relations, an optional background); a `Scene` is one concrete picture that satisfies it (every
object placed at pixel coordinates). The grammar turns specs into prompts, the parser turns prompts
back into specs, `realize` draws a random `Scene` for a spec, and the renderer rasterises scenes.

Geometry: a square canvas of `size` pixels split into a 3 x 3 grid of cells; rows 0..2 run top to
bottom, columns 0..2 left to right. Sizes are in units of the canvas so that every canvas size
describes the same world.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 185, 55),
    "blue": (45, 85, 235),
    "yellow": (240, 215, 30),
    "purple": (155, 55, 205),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 18),
    "white": (238, 238, 238),
    "gray": (125, 125, 125),
}
DEFAULT_BACKGROUND = "black"
SIZES: dict[str, float] = {"small": 0.2, "large": 0.3}  # object extent / canvas side
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MAX_COUNT = 3
MAX_OBJECTS = 4

# Named positions: (row, column) constraints; None leaves that axis free.
POSITIONS: dict[str, tuple[int | None, int | None]] = {
    "top left": (0, 0),
    "top": (0, None),
    "top right": (0, 2),
    "left": (None, 0),
    "center": (1, 1),
    "right": (None, 2),
    "bottom left": (2, 0),
    "bottom": (2, None),
    "bottom right": (2, 2),
}


@dataclass(frozen=True)
class ObjectSpec:
    """One group of identical objects a prompt asks for ("two small blue squares")."""

    shape: str
    colour: str
    size: str | None = None  # "small" | "large" | None (either)
    count: int = 1
    position: str | None = None  # a key of POSITIONS (the grammar gives one to single objects only)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; the world has {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; the world has {tuple(COLOURS)}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; use one of {tuple(SIZES)} or None")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be 1..{MAX_COUNT}, got {self.count}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; use one of {tuple(POSITIONS)}")


@dataclass(frozen=True)
class Relation:
    """objects[subject] <relation> objects[target], e.g. (0, "left of", 1).

    For a group (count > 1) the relation holds for every member; the grammar only relates single
    objects, but other people's prompts ("a red circle above two blue squares") parse too."""

    subject: int
    relation: str
    target: int

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; use one of {RELATIONS}")
        if self.subject == self.target:
            raise ValueError("a relation needs two different objects")


@dataclass(frozen=True)
class SceneSpec:
    """What a prompt asks for. Equality is structural, so parse(describe(spec)) == spec is testable."""

    objects: tuple[ObjectSpec, ...]
    relations: tuple[Relation, ...] = ()
    background: str | None = None  # None: the default background, not checked

    def __post_init__(self) -> None:
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        if self.n_objects > MAX_OBJECTS:
            raise ValueError(f"a scene holds at most {MAX_OBJECTS} objects, got {self.n_objects}")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; use one of {tuple(BACKGROUNDS)}")
        for rel in self.relations:
            for k in (rel.subject, rel.target):
                if not 0 <= k < len(self.objects):
                    raise ValueError(f"relation {rel} points outside the {len(self.objects)} objects")

    @property
    def n_objects(self) -> int:
        return sum(o.count for o in self.objects)

    @property
    def complexity(self) -> int:
        """A coarse difficulty level: objects to draw + constraints to satisfy (1 = "a red circle")."""
        constraints = len(self.relations) + sum(o.position is not None for o in self.objects)
        constraints += sum(o.size is not None for o in self.objects) + (self.background is not None)
        return self.n_objects + constraints

    def key(self) -> str:
        """A canonical text key of the spec (used to split held-out scenes from training scenes)."""
        objs = ";".join(f"{o.count}:{o.size}:{o.colour}:{o.shape}:{o.position}" for o in self.objects)
        rels = ";".join(f"{r.subject}:{r.relation}:{r.target}" for r in self.relations)
        return f"{objs}|{rels}|{self.background}"


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: shape, colour, centre and extent in canvas units ([0, 1] coordinates)."""

    shape: str
    colour: str
    cx: float
    cy: float
    extent: float


@dataclass(frozen=True)
class Scene:
    """A concrete picture: placed objects on a background."""

    objects: tuple[PlacedObject, ...]
    background: str = DEFAULT_BACKGROUND
    cells: tuple[tuple[int, int], ...] = field(default=())  # (row, col) of each object, for checks
