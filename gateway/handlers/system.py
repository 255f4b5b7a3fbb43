"""/healthz, /metrics and /openapi.json: what load balancers, scrapers and clients read."""

from importlib import resources

from aiohttp import web

from faas_gateway.runtime.status import health_response, metrics_response
from gateway.metrics import GatewayMetrics
from gateway.queue import GatewayQueue
from gateway.queues import ServedQueues

DOCUMENT_NAME = "openapi.json"


def document_bytes() -> bytes:
    """The OpenAPI document as shipped in the package (pyproject's package-data has it)."""
    return resources.files("gateway").joinpath(DOCUMENT_NAME).read_bytes()


class System:
    def __init__(self, queue: GatewayQueue, metrics: GatewayMetrics, queues: ServedQueues) -> None:
        self._queue = queue
        self._metrics = metrics
        self._queues = queues
        self._document = document_bytes()  # read once here rather than on every request

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return health_response(*await self._queue.health())

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        await self._queues.refresh()  # at most every few seconds
        return metrics_response(self._metrics.render())

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._document, content_type="application/json")
