"""The worker's own HTTP listener: /healthz and /metrics."""

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from faas_gateway.runtime.status import health_response, metrics_response
from queue_worker.metrics import WorkerMetrics

HealthCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
Refresh = Callable[[], Awaitable[None]]


class StatusServer:
    def __init__(
        self,
        host: str,
        port: int,
        metrics: WorkerMetrics,
        health: HealthCheck,
        refresh_metrics: Refresh,
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._health = health
        self._refresh_metrics = refresh_metrics
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._render_metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return health_response(*await self._health())

    async def _render_metrics(self, request: web.Request) -> web.Response:
        await self._refresh_metrics()
        return metrics_response(self._metrics.render())
