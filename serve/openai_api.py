"""The OpenAI Images API's pieces that are not routing: reading `model` (and the budget header) and
the `size` filter (the answer body is serve/answers.py). Pure (no Ray); errors are HTTPExceptions with what to send.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fastapi import HTTPException

from catimage.tables.pool import Candidate
from serve.schemas import BudgetOrLambda


def native_size(cand: Candidate) -> str | None:
    """WIDTHxHEIGHT a candidate draws at, when its generator block says (for the OpenAI `size`)."""
    gen = cand.generator
    if gen is None:
        return None
    if getattr(gen, "kind", None) == "http":
        return gen.size
    width, height = getattr(gen, "width", None), getattr(gen, "height", None)
    return f"{width}x{height}" if width and height else None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_model(model: str, header_budget: str | None, candidates: Sequence[str]) -> tuple[str | None, float | None, float | None]:
    """(pinned candidate or None, budget, lambda) from `model` and the X-Catimage-Budget header."""
    name, _, suffix = model.partition(":")
    if name != "auto":
        if model not in candidates:
            raise HTTPException(
                status_code=404,
                detail=f"model {model!r} does not exist here; use 'auto' (route), 'auto:budget=B', "
                f"'auto:lambda=L' or one of {list(candidates)}",
            )
        return model, None, None
    budget = lam = None
    if suffix:
        what, eq, value = suffix.partition("=")
        number = _number(value)
        if not eq or what not in ("budget", "lambda") or number is None:
            raise HTTPException(status_code=422, detail=f"model {model!r}: write auto, auto:budget=B or auto:lambda=L")
        budget, lam = (number, None) if what == "budget" else (None, number)
    if header_budget is not None:
        number = _number(header_budget)
        if number is None:
            raise HTTPException(status_code=422, detail="X-Catimage-Budget must be a number")
        if budget is not None or lam is not None:
            raise HTTPException(status_code=422, detail="give the budget once: in the model suffix or in X-Catimage-Budget")
        budget = number
    try:  # the same checks as /v1/generate's budget and lambda (finite, >= 0)
        checked = BudgetOrLambda.model_validate({"budget": budget, "lambda": lam})
    except ValueError as err:
        raise HTTPException(status_code=422, detail=f"model {model!r}: {err}") from None
    return None, checked.budget, checked.lambda_


def _offered(sizes: Mapping[str, str | None]) -> str:
    declared = {name: size for name, size in sizes.items() if size}
    if not declared:
        return "this pool declares no size for any candidate (no width/height in their generator blocks): omit size or send 'auto'"
    return "sizes offered, by candidate: " + ", ".join(f"{name} {size}" for name, size in declared.items())


def order_for_size(order: list[str], size: str | None, sizes: Mapping[str, str | None], pinned: str | None) -> list[str]:
    """The candidates of `order` that draw `size` (all of them for None/'auto'); 400 when none does,
    and when a pinned model does not draw it (never dropped in silence)."""
    if size in (None, "auto"):
        return order
    if pinned is not None and sizes.get(pinned) != size:
        drawn = sizes.get(pinned)
        what = f"draws {drawn}" if drawn else "declares no size"
        raise HTTPException(
            status_code=400,
            detail=f"model {pinned!r} {what}, not size {size!r}; ask for its size or 'auto', or use model 'auto' "
            f"to route among the candidates that draw {size!r}; {_offered(sizes)}",
        )
    fits = [c for c in order if sizes.get(c) == size]
    if not fits:
        raise HTTPException(status_code=400, detail=f"size {size!r} is not offered; {_offered(sizes)}")
    return fits
