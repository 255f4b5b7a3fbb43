"""Synchronous invocation: stream the request to the function and its response back."""

import asyncio
import logging

import aiohttp
from aiohttp import web

from faas_common.headers import CALL_ID, START_TIME, end_to_end
from faas_common.logs import call_context
from faas_common.registry import FunctionSpec, Registry
from gateway.calls import CALL, CallContext
from gateway.errors import GatewayError, UpstreamTimeoutError, UpstreamUnavailableError
from gateway.metrics import UNKNOWN_FUNCTION, GatewayMetrics
from gateway.routing import forwarded_headers, raw_subpath, resolve_function
from gateway.settings import GatewaySettings

log = logging.getLogger("faas.gateway")

# The client's headers go upstream as they are; aiohttp must not add its own defaults.
SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
REQUEST_HEADERS_NOT_FORWARDED = frozenset({"host", "expect"})


class SyncProxy:
    def __init__(
        self,
        settings: GatewaySettings,
        registry: Registry,
        session: aiohttp.ClientSession,
        metrics: GatewayMetrics,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._session = session
        self._metrics = metrics

    async def handle(self, request: web.Request) -> web.StreamResponse:
        call = request[CALL]
        name = request.match_info["name"]
        try:
            function = resolve_function(self._registry, name)
        except GatewayError as exc:
            self._metrics.observe_sync(UNKNOWN_FUNCTION, exc.status, call.elapsed_s())
            raise
        self._metrics.invocation_started.labels(function.name).inc()
        try:
            response = await self._forward(request, function, call)
        except GatewayError as exc:
            self._metrics.observe_sync(function.name, exc.status, call.elapsed_s())
            log.info("sync call failed: %s", exc.message, extra=call_context(call.call_id, name))
            raise
        return response

    async def _forward(
        self, request: web.Request, function: FunctionSpec, call: CallContext
    ) -> web.StreamResponse:
        headers = forwarded_headers(request, REQUEST_HEADERS_NOT_FORWARDED)
        headers[CALL_ID] = call.call_id
        headers[START_TIME] = str(call.start_ns)

        exec_timeout_s = function.exec_timeout_s or self._settings.upstream_timeout_s
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=function.write_timeout_s or self._settings.write_timeout_s,
            sock_read=function.read_timeout_s or self._settings.read_timeout_s,
        )
        url = function.url_for(raw_subpath(request), request.rel_url.raw_query_string)
        try:
            async with asyncio.timeout(exec_timeout_s):
                upstream = await self._session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=request.content if request.body_exists else None,
                    allow_redirects=False,
                    skip_auto_headers=SKIP_AUTO_HEADERS,
                    timeout=timeout,
                )
        except TimeoutError as exc:
            raise UpstreamTimeoutError(
                f"function {function.name!r} did not answer within its timeout"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailableError(
                f"function {function.name!r} is unreachable: {type(exc).__name__}"
            ) from exc

        async with upstream:
            code = upstream.status
            self._metrics.observe_sync(function.name, code, call.elapsed_s())
            response = web.StreamResponse(status=code, reason=upstream.reason)
            response.headers.extend(end_to_end(upstream.headers.items()))
            call.apply_to(response.headers)
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    try:
                        await response.write(chunk)
                    except ConnectionError:
                        # Caught around the write alone, where only the client can have failed:
                        # aiohttp's ClientConnectionResetError is also a ClientError, and the
                        # handler below would blame the function for the client leaving.
                        log.info(
                            "client went away during the response",
                            extra=call_context(call.call_id, function.name),
                        )
                        return response
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Headers are gone already; all that is left is to cut the response short.
                log.warning(
                    "function response broke off: %s",
                    type(exc).__name__,
                    extra=call_context(call.call_id, function.name),
                )
                raise
            await response.write_eof()
        return response
