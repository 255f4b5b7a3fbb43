"""GET /openapi.json: the gateway's OpenAPI 3.1 document, kept beside this module."""

from importlib import resources

from aiohttp import web

from gateway.routes import Handler

DOCUMENT_NAME = "openapi.json"


def document_bytes() -> bytes:
    """The document as shipped in the package (pyproject's package-data includes it)."""
    return resources.files("gateway").joinpath(DOCUMENT_NAME).read_bytes()


def document_route() -> Handler:
    """A handler serving the document, read once here rather than on every request."""
    body = document_bytes()

    async def route(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    return route
