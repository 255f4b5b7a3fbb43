"""The bodies of /healthz and /metrics, the same for the gateway and the worker."""

from typing import Any

import orjson
from aiohttp import web

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def health_response(healthy: bool, details: dict[str, Any]) -> web.Response:
    """200 and ``"status": "ok"``, or 503 and ``"unavailable"``, with what was checked."""
    details["status"] = "ok" if healthy else "unavailable"
    return web.Response(
        status=200 if healthy else 503,
        body=orjson.dumps(details, option=orjson.OPT_APPEND_NEWLINE),
        content_type="application/json",
    )


def metrics_response(exposition: bytes) -> web.Response:
    response = web.Response(body=exposition)
    response.headers["Content-Type"] = PROMETHEUS_CONTENT_TYPE
    return response
