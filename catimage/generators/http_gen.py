"""A hosted model behind an OpenAI-style images endpoint.

Each prompt is one ``POST {url}`` with JSON ``{model, prompt, n: 1, size, response_format: b64_json}``
(plus `spec.params`, and the seed under `spec.seed_field` when set) and ``Authorization: Bearer
$<api_key_env>``. The reply's ``data[0].b64_json`` (or ``data[0].url``) becomes a PIL image.

Seeds: hosted APIs mostly take no seed (OpenAI's does not) or may ignore it, so images from an http
candidate are not reproducible the way diffusers candidates are; set `seed_field: seed` for servers
that honour one. Transient failures (HTTP 429, 5xx, connection errors) are retried with exponential
backoff (honouring Retry-After up to 60 s); other errors fail at once with the server's message.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import time
from typing import Any

import httpx
from PIL import Image

from catimage.errors import CatimageError
from catimage.generators.base import Generator
from catimage.generators.spec import HttpSpec

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class HttpGenerator(Generator):
    """One `httpx.Client` per generator (connection reuse); requests are sent one prompt at a time."""

    def __init__(self, spec: HttpSpec) -> None:
        self.spec = spec
        headers = {"Content-Type": "application/json"}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise CatimageError(
                    f"the http generator for {spec.model!r} reads its API key from the environment variable "
                    f"{spec.api_key_env}, which is not set: export {spec.api_key_env}=... (on a Ray cluster, pass "
                    "it in the job's runtime_env env_vars)"
                )
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(timeout=spec.timeout_s, headers=headers, follow_redirects=True)

    def payload(self, prompt: str, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.spec.model, "prompt": prompt, "n": 1, "size": self.spec.size}
        if self.spec.response_format:
            body["response_format"] = self.spec.response_format
        body.update(self.spec.params)
        if self.spec.seed_field and seed is not None:
            body[self.spec.seed_field] = int(seed)
        return body

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        self._check_batch(prompts, seeds)
        return [self._one(p, s) for p, s in zip(prompts, seeds, strict=True)]

    def _one(self, prompt: str, seed: int) -> Image.Image:
        body = self.payload(prompt, seed)
        wait = self.spec.retry_backoff_s
        for attempt in range(self.spec.max_retries + 1):
            last = attempt == self.spec.max_retries
            try:
                resp = self._client.post(self.spec.url, json=body)
            except httpx.TransportError as err:
                if last:
                    raise CatimageError(
                        f"cannot reach {self.spec.url} after {attempt + 1} tries ({type(err).__name__}: {err})"
                    ) from None
                log.warning("%s: %s; retrying in %.1f s", self.spec.url, err, wait)
            else:
                if resp.status_code < 400:
                    return self._decode(resp)
                if resp.status_code not in _RETRY_STATUS or last:
                    raise CatimageError(
                        f"{self.spec.url} answered HTTP {resp.status_code} after {attempt + 1} tries: "
                        f"{resp.text[:500]}" + _hint(resp.status_code)
                    )
                wait = max(wait, _retry_after(resp))
                log.warning("%s answered %d; retrying in %.1f s", self.spec.url, resp.status_code, wait)
            time.sleep(wait)
            wait *= 2
        raise AssertionError("unreachable")

    def _decode(self, resp: httpx.Response) -> Image.Image:
        try:
            item = resp.json()["data"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise CatimageError(
                f"{self.spec.url} did not answer an images response ({{'data': [{{'b64_json': ...}}]}}): {resp.text[:300]}"
            ) from None
        if item.get("b64_json"):
            raw = base64.b64decode(item["b64_json"])
        elif item.get("url"):
            raw = self._client.get(item["url"]).raise_for_status().content
        else:
            raise CatimageError(f"{self.spec.url} answered an image with neither b64_json nor url: {list(item)}")
        image = Image.open(io.BytesIO(raw))
        image.load()
        return image.convert("RGB")

    def close(self) -> None:
        self._client.close()


def _retry_after(resp: httpx.Response) -> float:
    try:
        return min(float(resp.headers.get("retry-after", 0)), 60.0)
    except ValueError:
        return 0.0


def _hint(status: int) -> str:
    if status in (401, 403):
        return " (check the API key in the environment variable named by api_key_env)"
    if status == 400:
        return " (if the server rejects a field, drop it: seed_field: null, response_format: null, or edit params)"
    return ""
