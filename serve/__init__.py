"""Ray Serve application of catimage: a FastAPI router in front of one generator deployment per candidate.

`serve/app.py` holds the router deployment and the application builder (`build_app`),
`serve/generator_deployment.py` the per-candidate generator deployment, `serve/budget_coordinator.py`
the budget coordinator deployment, `serve/errors.py` the HTTP error answers, `serve/schemas.py` the
request/response models, `serve/config.yaml` the config that `serve run` / `serve deploy` take.
Kept out of `catimage/` because the core must not import Ray.
"""
