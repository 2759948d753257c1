"""The one exception family users see: every message says what was wrong and what to do next."""


class CatimageError(ValueError):
    """Bad input at a boundary (file, flag, request). Subclasses ValueError so callers that expect
    ValueError from validation keep working."""


class TableError(CatimageError):
    """A quality table is missing columns, empty, or holds values the pipeline cannot use."""


class PoolError(CatimageError):
    """A pool file is malformed: duplicate names, negative cost, unknown keys, ..."""


class BudgetError(CatimageError):
    """A cost budget that no routing can meet (below the cheapest candidate) or is not a number."""
