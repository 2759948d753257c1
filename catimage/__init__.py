"""catimage: route each text-to-image prompt to the cheapest generator that still draws it well.

The package is a pure core (numpy / torch / pyarrow, no Ray), one subpackage per layer:
`tables` (the quality table, pool, costs, build helpers), `features` (prompt embedders),
`estimators` (quality estimators), `model` (the fit pipeline and router bundle), `policy` (routing,
budgets), `evaluation` (curves, figures, reports), `generators`, `metrics` and the scene `world`.
The Ray shells live in `jobs/` and `serve/`; docs/architecture.md maps every concept to its file.
"""

__version__ = "0.1.0"
