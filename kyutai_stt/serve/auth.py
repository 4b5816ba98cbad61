"""API keys: one check for every endpoint, compared in constant time.

A key may come as ``Authorization: Bearer KEY`` (OpenAI clients), ``Authorization: Token KEY`` (Deepgram clients), ``kyutai-api-key: KEY`` (Kyutai clients), or the
query parameter ``auth_id=KEY`` / ``api_key=KEY`` (browsers cannot set WebSocket headers). With no key configured,
everything is open.
"""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection


def provided_key(conn: HTTPConnection) -> str | None:
    authorization = conn.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() in ("bearer", "token"):  # "Token KEY": Deepgram's clients
        return credentials.strip()
    return conn.headers.get("kyutai-api-key") or conn.query_params.get("auth_id") or conn.query_params.get("api_key")


def is_authorized(conn: HTTPConnection) -> bool:
    keys: list[str] = conn.app.state.service.settings.api_keys
    if not keys:
        return True
    key = provided_key(conn)
    if not key:
        return False
    # compare against every key so the time taken does not depend on which (if any) matched
    matched = False
    for candidate in keys:
        matched |= hmac.compare_digest(key.encode(), candidate.encode())
    return matched
