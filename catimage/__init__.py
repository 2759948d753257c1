"""catimage: route each text-to-image prompt to the cheapest generator that still draws it well.

The package is a pure core (numpy / torch / pyarrow, no Ray): pools and costs (`pool`), the quality
table (`table`), prompt embedders (`embed`), quality estimators (`estimators`), the routing rule
(`routing`), evaluation (`evaluation`, `report`), generators, metrics and cost counting. The Ray
shells live in `jobs/` and `serve/`.
"""

__version__ = "0.1.0"
