"""The embedders that stand alone (every kind but `combined`), by name: what `combined` builds its
text part from. Kept apart from `registry`, which also lists `combined`, so that nothing imports back.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from catimage.errors import CatimageError
from catimage.features.base import EMBEDDER_JSON, RUNTIME_KEYS, Embedder
from catimage.features.text import ClipTextEmbedder, MiniLMEmbedder
from catimage.features.tfidf import TfidfEmbedder

SINGLE_EMBEDDERS: dict[str, type[Embedder]] = {
    MiniLMEmbedder.name: MiniLMEmbedder,
    ClipTextEmbedder.name: ClipTextEmbedder,
    TfidfEmbedder.name: TfidfEmbedder,
}


def build_embedder(kinds: dict[str, type[Embedder]], name: str, **params: Any) -> Embedder:
    """An embedder of kind `name` from `kinds`, with a message naming the kinds on a typo."""
    try:
        cls = kinds[name]
    except KeyError:
        raise CatimageError(f"unknown embedder {name!r}; choose one of {sorted(kinds)}") from None
    try:
        return cls(**params)
    except TypeError as err:
        raise CatimageError(f"bad parameters for the {name} embedder: {err}") from None


def restore_embedder(kinds: dict[str, type[Embedder]], directory: str | Path, **runtime: Any) -> Embedder:
    """Reverse `Embedder.save` for a kind in `kinds`; `runtime` sets runtime options only (RUNTIME_KEYS)."""
    directory = Path(directory)
    path = directory / EMBEDDER_JSON
    if not path.is_file():
        raise CatimageError(f"{directory} has no {EMBEDDER_JSON}; pass a directory written by Embedder.save")
    data = json.loads(path.read_text())
    spec = dict(data["spec"])
    bad = set(runtime) - RUNTIME_KEYS
    if bad:
        raise CatimageError(f"load_embedder only overrides {sorted(RUNTIME_KEYS)}; got {sorted(bad)}")
    # A runtime option applies where the kind takes it (minilm's `backend` is absent from specs
    # saved without it); kinds without it (tfidf) or that pass it on (combined) ignore it here.
    accepted = set(inspect.signature(kinds[spec["name"]].__init__).parameters) if spec.get("name") in kinds else set()
    spec.update({k: v for k, v in runtime.items() if k in spec or k in accepted})
    return build_embedder(kinds, **spec).load_state(directory, data, dict(runtime))


def make_single_embedder(name: str, **params: Any) -> Embedder:
    return build_embedder(SINGLE_EMBEDDERS, name, **params)


def load_single_embedder(directory: str | Path, **runtime: Any) -> Embedder:
    return restore_embedder(SINGLE_EMBEDDERS, directory, **runtime)
