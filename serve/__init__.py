"""Ray Serve application of catimage: a FastAPI router in front of one generator deployment per candidate.

`serve/app.py` builds the application (`build_app`) after its start-up checks; `serve/router.py` is
the router deployment (choose, draw through `serve/drawing.py`, account costs into
`serve/ledger.py`, lambdas from `serve/lambdas.py`, the OpenAI pieces in `serve/openai_api.py`);
`serve/bundle.py` loads the router bundle with runtime options; `serve/resources.py` checks the
cluster can place the app; `serve/generator_deployment.py` and `serve/budget_coordinator.py` are the
other deployments; `serve/errors.py` the HTTP error answers; `serve/schemas.py` the request/response
models; `serve/config.yaml` the config that `serve run` / `serve deploy` take.
Kept out of `catimage/` because the core must not import Ray.
"""
