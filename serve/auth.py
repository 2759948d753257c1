"""Optional bearer-token auth of the HTTP API (AppArgs.auth_token_env).

The keys come from one environment variable, read when a router replica starts:

    CATIMAGE_API_KEYS="alice:sk-alice-...,batch-jobs:sk-batch-..."    # named keys
    CATIMAGE_API_KEYS="sk-..."                                         # one key, named "default"

On Kubernetes, map a Secret into that variable (deploy/kuberay/rayservice.yaml); locally, export it
before `serve run` (replicas inherit the Ray node's environment) or set it in the application's
runtime_env. A key's *name* (never the token) is what logs, per-key budgets and metrics see.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from catimage.errors import CatimageError

PUBLIC_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
"""Paths served without a token: liveness and the API's own description (they carry no data)."""


@dataclass(frozen=True)
class ApiKeys:
    """Token -> key name."""

    names: dict[str, str]

    @classmethod
    def parse(cls, text: str, source: str = "the API key variable") -> ApiKeys:
        names: dict[str, str] = {}
        entries = [e.strip() for e in text.split(",") if e.strip()]
        if not entries:
            raise CatimageError(f"{source} is empty; put one token, or name:token pairs separated by commas")
        for entry in entries:
            name, sep, token = entry.partition(":")
            if not sep:
                name, token = ("default" if len(entries) == 1 else f"key{len(names) + 1}"), entry
            name, token = name.strip(), token.strip()
            if len(token) < 16:
                raise CatimageError(f"{source}: the token of key {name!r} is shorter than 16 characters; use a long random token")
            if token in names:
                raise CatimageError(f"{source}: two keys share one token")
            names[token] = name
        return cls(names)

    @classmethod
    def from_env(cls, variable: str | None) -> ApiKeys | None:
        """None when auth is off (no variable configured)."""
        if variable is None:
            return None
        value = os.environ.get(variable)
        if value is None:
            raise CatimageError(
                f"auth_token_env is {variable!r} but that environment variable is not set on this node; "
                f"export {variable}=... before starting Ray (or set it in the app's runtime_env), or drop auth_token_env"
            )
        return cls.parse(value, source=f"${variable}")

    def name_for(self, authorization: str | None) -> str | None:
        """The key's name for an `Authorization: Bearer <token>` header, or None when it matches none.

        Every token is compared in constant time, so the answer's timing says nothing about the keys.
        """
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        token = token.strip().encode("utf-8", "backslashreplace")
        found = None
        for known, name in self.names.items():
            if hmac.compare_digest(known.encode("utf-8"), token):
                found = name
        return found
