"""OpenWhisk's REST API under /api/v1: actions, their invocation, and activations.

An action is a function of the registry (the functions file or /system/functions, written
through the same deploy path: gateway/handlers/functions.py); an activation is a call's
record (faas_gateway/nats/activations.py), shown in OpenWhisk's shape
(faas_gateway/core/openwhisk.py). Errors, auth and the X-Request-ID header are the route
wrapper's (gateway/routes.py ``openwhisk``). docs/openwhisk.md has the mapping and where it
differs from OpenWhisk.

Invocations:
- non-blocking: recorded and queued as /async-function does (GatewayQueue.enqueue), 202
  ``{"activationId"}`` after JetStream's ack; a worker runs it.
- blocking: the function is called from here, as /function/<name> does (no queue: a blocking
  call must add well under a millisecond), for at most ``timeout`` ms; a call still running
  then is handed to TurnAsync (recorded, its outcome recorded when it ends) and answered 202
  ``{"activationId"}``. A call that ends in time is recorded without waiting for NATS's ack:
  its caller has the answer already, and the record is only for later reads.
"""

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping
from pydantic import ValidationError

from faas_gateway import __version__
from faas_gateway.core.call import QueuedCall
from faas_gateway.core.functions import FunctionSpec, Registry, is_valid_function_name
from faas_gateway.core.openwhisk import (
    HTTP_STATUS,
    URL_ANNOTATION,
    action_document,
    activation_document,
    activation_response,
    activation_status,
    activation_summary,
    epoch_ms,
    function_name,
    result_bytes,
)
from faas_gateway.core.outcome import Outcome
from faas_gateway.http.client import UpstreamClient, UpstreamResponse
from faas_gateway.http.outcomes import outcome_of
from faas_gateway.nats.activations import (
    INLINE_RESULT_BYTES,
    Activation,
    ActivationStore,
    ActivationStoreError,
    ListQuery,
    StoredActivation,
)
from faas_gateway.nats.function_store import (
    FunctionDeployment,
    FunctionExistsError,
    FunctionNotDeployedError,
)
from faas_gateway.runtime.logs import call_context
from gateway.errors import (
    MAPPED_ERRORS,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    http_error,
)
from gateway.handlers.enqueue import read_body_within, too_large_for_async
from gateway.handlers.functions import Functions, build_sha, describe
from gateway.handlers.sync import SyncProxy, WholeRequest
from gateway.handlers.turn_async import TurnAsync
from gateway.loops import VIA, Hops
from gateway.metrics import GatewayMetrics
from gateway.queue import GatewayQueue
from gateway.request import CALL_ID_PATTERN, CallContext, new_call_id
from gateway.request_bodies import read_body

log = logging.getLogger("faas.gateway")

ACTIVATION_ID_HEADER = "x-openwhisk-activation-id"
# OpenWhisk's max-wait-for-blocking-activation, and the most ?timeout= may ask for.
MAX_BLOCKING_WAIT_MS = 60_000
# A blocking call's 202 goes out this much before its timeout (answer_within_s).
EARLY_ANSWER_MS = 100
DEFAULT_LIST_LIMIT = 30
MAX_LIST_LIMIT = 200
MAX_ACTION_BYTES = 64 * 1024
WHOLE_NUMBER = re.compile(r"[+-]?[0-9]{1,12}")

MALFORMED = "The request content was malformed:\n"
INVALID_TIMEOUT = f"Timeout must be number of milliseconds up to {MAX_BLOCKING_WAIT_MS}."
HOW_TO_GIVE_A_URL = (
    'give the action the URL where it listens: {"exec": {"kind": "blackbox", "image": '
    '"<any name>"}, "annotations": [{"key": "url", "value": "http://host:port/path"}]}'
)
CODE_ACTION = (
    "This gateway calls HTTP functions and runs no code, so an action cannot be created "
    f"from exec.code; {HOW_TO_GIVE_A_URL}."
)
PARAMS_HEADERS = (("Content-Type", "application/json"),)


class OpenWhisk:
    def __init__(
        self,
        registry: Registry,
        functions: Functions,
        queue: GatewayQueue,
        records: ActivationStore,
        sync: SyncProxy,
        turn_async: TurnAsync,
        client: UpstreamClient,
        metrics: GatewayMetrics,
        hops: Hops,
        *,
        namespace: str,
        max_result_bytes: int,
        max_held_bytes: int,
        body_timeout_s: float,
        record_calls: bool,
    ) -> None:
        self._registry = registry
        self._functions = functions
        self._queue = queue
        self._records = records
        self._sync = sync
        self._turn_async = turn_async
        self._client = client
        self._metrics = metrics
        self._hops = hops
        self.namespace = namespace
        self._namespaces = frozenset({"_", namespace})
        self._max_result_bytes = max_result_bytes
        self._max_held_bytes = max_held_bytes
        self._body_timeout_s = body_timeout_s
        self._record_calls = record_calls  # off only with record_activations=false (bench)
        self._background: set[asyncio.Task[None]] = set()

    # the API and its namespace

    async def info(self, request: web.Request) -> web.Response:
        return _json(
            200,
            {
                "description": "faas-gateway: OpenWhisk's API for HTTP functions",
                "api_paths": ["/api/v1"],
                "build": __version__,
                "buildno": build_sha(),
                "limits": {"max_blocking_wait_ms": MAX_BLOCKING_WAIT_MS},
            },
        )

    async def namespaces(self, request: web.Request) -> web.Response:
        return _json(200, [self.namespace])

    # actions

    async def list_actions(self, request: web.Request) -> web.Response:
        self._check_namespace(request)
        query = request.rel_url.query
        skip, limit = parse_skip(query, "actions"), parse_limit(query, "actions")
        functions = sorted(self._registry, key=lambda function: function.name)
        if is_true(query.get("count")):
            return _json(200, {"actions": max(0, len(functions) - skip)})
        return _json(200, [self._action(function) for function in functions[skip:][:limit]])

    async def get_action(self, request: web.Request) -> web.Response:
        return _json(200, self._action(self._function(request)))

    async def delete_action(self, request: web.Request) -> web.Response:
        function = self._function(request)
        document = self._action(function)
        await self._functions.remove(function.name)
        return _json(200, document)

    async def put_action(self, request: web.Request) -> web.Response:
        """Create (409 if it exists, unless ``overwrite=true``) or update an action that
        points at a URL; see ActionPut for what the body may hold."""
        self._check_namespace(request)
        name = function_name(request.match_info.get("package"), request.match_info["name"])
        overwrite = is_true(request.rel_url.query.get("overwrite"))
        put = ActionPut.parse(await self._read_json(request, MAX_ACTION_BYTES, allow_empty=True))
        existing = self._registry.get(name)
        if existing is not None and not overwrite:
            raise ConflictError("resource already exists")
        deployment = self._deployment(name, put, existing)
        await self._functions.check(deployment)
        try:
            await self._functions.save(deployment, create=existing is None)
        except FunctionExistsError as exc:  # created meanwhile, by another request
            if not overwrite:
                raise ConflictError("resource already exists") from exc
            await self._functions.save(deployment, create=False)
        except FunctionNotDeployedError:  # deleted meanwhile: overwrite makes it again
            await self._functions.save(deployment, create=True)
        function = self._registry.get(name)
        if function is None:  # deleted again at once by another request
            raise NotFoundError(f"action {name!r} was deleted while it was written")
        return _json(200, self._action(function))

    def _deployment(
        self, name: str, put: "ActionPut", existing: FunctionSpec | None
    ) -> FunctionDeployment:
        """The function an action PUT makes: what the body gives, the rest kept from the
        function it updates (as OpenWhisk keeps what an update leaves out)."""
        before = self._functions.deployment_of(existing)[0] if existing else None
        url = put.url or (before.url if before else None)
        if url is None:
            raise InvalidRequestError(f"The action has no URL: {HOW_TO_GIVE_A_URL}.")
        annotations = dict(put.annotations if put.annotations is not None else ())
        if put.annotations is None and before is not None:
            annotations = dict(before.annotations)
        if put.timeout_ms is not None:
            annotations["exec_timeout"] = f"{put.timeout_ms}ms"
        elif before is not None and "exec_timeout" in before.annotations:
            annotations.setdefault("exec_timeout", before.annotations["exec_timeout"])
        image = put.image if put.image is not None else (before.image if before else "")
        try:
            return FunctionDeployment(service=name, url=url, image=image, annotations=annotations)
        except ValidationError as exc:
            raise InvalidRequestError(f"invalid action: {describe(exc)}") from exc

    def _action(self, function: FunctionSpec) -> dict[str, Any]:
        deployment, created_at, _ = self._functions.deployment_of(function)
        return action_document(
            namespace=self.namespace,
            function=function.name,
            url=function.url,
            image=deployment.image,
            annotations=function.annotations,
            timeout_ms=self._timeout_ms(function),
            updated_ms=epoch_ms(created_at),
        )

    # invocation

    async def invoke(self, request: web.Request) -> web.Response:
        function = self._function(request)

        async def body() -> bytes:
            limit = self._queue.max_body_bytes()
            return await read_body_within(request, limit, self._body_timeout_s)

        return await self._invoke(function, request.rel_url.query, request.headers, body)

    def takes_invoke_whole(self, namespace: str, name: str, body_length: int) -> bool:
        """Whether the lean server (gateway/invocation_server.py) may take this invoke whole:
        an action that exists in the caller's namespace and a body within its limit. Anything
        else goes to ``invoke`` through aiohttp, which answers the 404 or 413."""
        return (
            namespace in self._namespaces
            and self._registry.get(name) is not None
            and body_length <= self._queue.max_body_bytes()
        )

    async def invoke_whole(
        self, name: str, query: Mapping[str, str], request: WholeRequest
    ) -> web.Response:
        """An invoke the lean server took whole (``takes_invoke_whole``): the same steps as
        invoke, so that a blocking invoke adds no more than /function/<name> does."""
        function = self._registry.get(name)
        if function is None:  # removed since
            raise NotFoundError(f"no action {name!r}")

        async def body() -> bytes:
            if request.body_length > self._queue.max_body_bytes():
                raise too_large_for_async(self._queue.max_body_bytes())
            return await request.body() or b""

        return await self._invoke(function, query, request.headers, body)

    async def _invoke(
        self,
        function: FunctionSpec,
        query: Mapping[str, str],
        incoming: MultiMapping[str],
        read_body: Callable[[], Awaitable[bytes]],
    ) -> web.Response:
        blocking, result_only, wait_ms = parse_invoke_query(query)
        call = CallContext(new_call_id())
        headers = [*PARAMS_HEADERS, (VIA, self._hops.via_for(incoming, function.name))]
        if not blocking:
            self._queue.raise_unless_ready()
        params = self._params(await read_body())
        queued = QueuedCall(
            call_id=call.call_id,
            function=function.name,
            method="POST",
            path="",
            query="",
            headers=headers,
            body=params,
            callback_url=None,
            accepted_at_ns=call.start_ns,
        )
        if not blocking:
            return await self._enqueue(queued, function)
        return await self._blocking(queued, function, call, result_only, answer_within_s(wait_ms))

    def _params(self, body: bytes) -> bytes:
        """The invoke's body, a JSON object, as the function gets it: ``{}`` when empty."""
        if not body.strip():
            return b"{}"
        if not isinstance(_parsed(body), dict):
            raise InvalidRequestError(f"{MALFORMED}the parameters must be a JSON object")
        return body

    async def _enqueue(self, queued: QueuedCall, function: FunctionSpec) -> web.Response:
        try:
            await self._queue.enqueue(queued, function.queue)
        except MAPPED_ERRORS as exc:
            self._metrics.observe_async(function.name, http_error(exc).status)
            raise
        self._metrics.observe_async(function.name, 202)
        return accepted(queued.call_id)

    async def _blocking(
        self,
        queued: QueuedCall,
        function: FunctionSpec,
        call: CallContext,
        result_only: bool,
        wait_s: float,
    ) -> web.Response:
        hold = self._sync.hold(function, call)  # 429 at the function's max_inflight
        try:
            self._turn_async.raise_if_full()  # it may turn async: 429 before it is sent
            pending = self._send(queued, function, call)
            try:
                if not await ended_within(pending, wait_s):
                    taken = await self._turn_async.take_over(call, queued, function, pending, hold)
                    if taken is not None:
                        self._metrics.observe_sync(function.name, 202, call.elapsed_s())
                        return accepted(call.call_id)
                outcome = await self._outcome(pending, function, call)
            except asyncio.CancelledError:
                pending.cancel()  # the client left before the call turned async
                raise
        finally:
            hold.release()  # unless the call that turned async took it over
        self._metrics.observe_sync(function.name, outcome.status_code, call.elapsed_s())
        response = self.result_of(outcome)
        activation = None
        if result_only:
            body = result_bytes(response["result"])
        else:
            activation = ended_activation(queued, call, outcome)
            document = activation_document(
                activation.to_json(),
                response,
                namespace=self.namespace,
                subject=self.namespace,
                timeout_ms=self._timeout_ms(function),
            )
            body = orjson.dumps(document, option=orjson.OPT_APPEND_NEWLINE)
        if self._record_calls:
            # After the answer: the task first runs once this one has handed its response
            # to the connection.
            self._in_background(self._record_ended(queued, call, outcome, activation))
        answer = web.Response(
            status=HTTP_STATUS[response["status"]], body=body, content_type="application/json"
        )
        answer.headers[ACTIVATION_ID_HEADER] = call.call_id
        return answer

    async def call_blocking(
        self, queued: QueuedCall, function: FunctionSpec, call: CallContext, *, record: bool
    ) -> Outcome:
        """Call the function now, within its own timeouts, and wait for its outcome (it never
        turns async): a feed action's lifecycle event, a connector's sync invocation. With
        ``record``, its record is written after, as a blocking invoke's is. TooManyRequests
        (429) when the function is at its max_inflight."""
        hold = self._sync.hold(function, call)
        try:
            pending = self._send(queued, function, call)
            try:
                outcome = await self._outcome(pending, function, call)
            except asyncio.CancelledError:
                pending.cancel()
                raise
        finally:
            hold.release()
        self._metrics.observe_sync(function.name, outcome.status_code, call.elapsed_s())
        if record and self._record_calls:
            self._in_background(self._record_ended(queued, call, outcome, None))
        return outcome

    def _send(
        self, queued: QueuedCall, function: FunctionSpec, call: CallContext
    ) -> "asyncio.Task[UpstreamResponse]":
        """The call to the function, started: its answer is the task's."""
        self._metrics.started(function.name)
        headers = [*queued.headers, ("X-Call-Id", call.call_id)]
        headers.append(("X-Start-Time", str(call.start_ns)))
        return asyncio.create_task(
            self._client.request(
                "POST",
                function.url_for("", ""),
                headers,
                queued.body,
                self._sync.timeouts(function),
            )
        )

    def result_of(self, outcome: Outcome) -> dict[str, Any]:
        """An outcome as an activation's ``response``: ``{status, success, result}``."""
        return activation_response(
            finished="succeeded" if outcome.succeeded else "failed",
            failed_by=outcome.failed_by,
            error=outcome.error,
            status_code=outcome.status_code,
            headers=outcome.headers,
            body=outcome.body,
            body_size=outcome.body_size,
            cut=outcome.spooled_size is not None,
            max_result_bytes=self._max_result_bytes,
        )

    async def _outcome(
        self, pending: "asyncio.Task[UpstreamResponse]", function: FunctionSpec, call: CallContext
    ) -> Outcome:
        return await outcome_of(
            pending,
            function=function.name,
            spool_name=call.call_id,
            started_monotonic=call.started_monotonic,
            max_held_bytes=self._max_held_bytes,
            spool=self._records.results,
            timeout_error=f"function {function.name!r} did not answer within its timeout",
        )

    async def _record_ended(
        self,
        queued: QueuedCall,
        call: CallContext,
        outcome: Outcome,
        activation: Activation | None,
    ) -> None:
        """The record of a blocking call that ended in time, written after the answer and,
        when its body sits in the record (nearly every call), without waiting for the ack:
        the caller has its answer already, and the record is only for later reads. A large
        body goes to the object store first (store_result), and that write is awaited."""
        if activation is None:
            activation = ended_activation(queued, call, outcome)
        context = call_context(activation.call_id, activation.function)
        try:
            kept, stored = await self._records.store_result(activation.call_id, outcome)
            activation.note_stored(stored)
            if outcome.spooled_size is None and outcome.body_size > INLINE_RESULT_BYTES:
                await self._records.create(activation, kept)
            else:
                await self._records.create_nowait(activation, kept)
        except ActivationStoreError as exc:
            log.warning("record of a blocking call not written: %s", exc, extra=context)

    def _in_background(self, write: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(write)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Record writes still under way finish before NATS is closed."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=5.0)

    # activations

    async def list_activations(self, request: web.Request) -> web.Response:
        self._check_namespace(request)
        query = request.rel_url.query
        docs, count = is_true(query.get("docs")), is_true(query.get("count"))
        if docs and count:
            raise InvalidRequestError("The parameter 'docs' is not permitted with 'count'.")
        listing = ListQuery(
            function=parse_name_filter(query.get("name")),
            limit=parse_limit(query, "activations"),
            since_ns=parse_epoch_ms(query, "since"),
            upto_ns=parse_epoch_ms(query, "upto"),
            skip=parse_skip(query, "activations"),
            finished_only=True,  # as OpenWhisk: an activation exists once it has ended
        )
        if count:
            return _json(200, {"activations": await self._records.count(listing)})
        found = await self._records.newest_stored(listing)
        if docs:
            return _json(200, [await self._activation(stored) for stored in found])
        return _json(200, [self._summary(stored) for stored in found])

    async def activation(self, request: web.Request) -> web.Response:
        return _json(200, await self._activation(await self._ended(request)))

    async def activation_result(self, request: web.Request) -> web.Response:
        stored = await self._ended(request)
        response = await self._response(stored)
        return _json(
            200,
            {
                "result": response["result"],
                "success": response["success"],
                "status": response["status"],
            },
        )

    async def activation_logs(self, request: web.Request) -> web.Response:
        stored = await self._ended(request)
        return _json(200, {"logs": list(stored.record.get("logs") or ())})

    async def _ended(self, request: web.Request) -> StoredActivation:
        """The record of an activation that has ended; 404 before then, as OpenWhisk has
        no activation to show until its record is written at the end."""
        self._check_namespace(request)
        activation_id = request.match_info["activation_id"]
        if CALL_ID_PATTERN.fullmatch(activation_id) is None:
            raise InvalidRequestError("The activation id is not valid.")
        stored = await self._records.get(activation_id)
        if stored is None or not stored.is_final:
            raise NotFoundError(f"no ended activation {activation_id!r}")
        return stored

    async def _activation(self, stored: StoredActivation) -> dict[str, Any]:
        return activation_document(
            stored.record,
            await self._response(stored),
            namespace=self.namespace,
            subject=self.namespace,
            timeout_ms=self._record_timeout_ms(stored.record),
        )

    async def _response(self, stored: StoredActivation) -> dict[str, Any]:
        record = stored.record
        kept = record.get("response") or {}
        body = await self._records.result_body(stored)
        content_type = kept.get("contentType")
        return activation_response(
            finished=str(record.get("status")),
            failed_by=record.get("failedBy"),
            error=record.get("error"),
            status_code=int(record.get("statusCode") or 502),
            headers=[("Content-Type", str(content_type))] if content_type else [],
            body=body,
            body_size=int(kept.get("bodySize") or len(body)),
            cut=bool(kept.get("storageFull")),
            max_result_bytes=self._max_result_bytes,
        )

    def _summary(self, stored: StoredActivation) -> dict[str, Any]:
        record = stored.record
        kept = record.get("response") or {}
        status = activation_status(
            str(record.get("status")),
            record.get("failedBy"),
            int(kept.get("bodySize") or 0),
            bool(kept.get("storageFull")),
            self._max_result_bytes,
        )
        return activation_summary(
            record, status, namespace=self.namespace, timeout_ms=self._record_timeout_ms(record)
        )

    def _record_timeout_ms(self, record: Mapping[str, Any]) -> int | None:
        """The timeout of the function a record is of (none for a trigger's)."""
        if record.get("kind") is not None:
            return None
        return self._timeout_ms(self._registry.get(str(record.get("function"))))

    # helpers

    def _check_namespace(self, request: web.Request) -> None:
        if request.match_info["namespace"] not in self._namespaces:
            raise NotFoundError(f"no namespace {request.match_info['namespace']!r}")

    def _function(self, request: web.Request) -> FunctionSpec:
        self._check_namespace(request)
        name = function_name(request.match_info.get("package"), request.match_info["name"])
        function = self._registry.get(name) if is_valid_function_name(name) else None
        if function is None:
            raise NotFoundError(f"no action {name!r}")
        return function

    def _timeout_ms(self, function: FunctionSpec | None) -> int | None:
        if function is None:
            return None
        total_s = self._sync.timeouts(function).total_s
        return None if total_s is None else round(total_s * 1000)

    async def _read_json(self, request: web.Request, limit: int, *, allow_empty: bool) -> Any:
        return await read_json_body(request, limit, self._body_timeout_s, allow_empty=allow_empty)


class ActionPut:
    """What an action PUT may hold: ``exec`` of kind blackbox (its ``image`` is kept and
    shown, nothing runs it), ``annotations`` (``url``: where the function listens; the others
    become the function's annotations, JSON values other than strings as JSON text) and
    ``limits.timeout`` (ms: the function's exec_timeout). Code, sequences and parameters
    are refused with a 400 that says why."""

    __slots__ = ("annotations", "image", "timeout_ms", "url")

    def __init__(
        self,
        url: str | None,
        image: str | None,
        annotations: dict[str, str] | None,
        timeout_ms: int | None,
    ) -> None:
        self.url = url
        self.image = image
        self.annotations = annotations
        self.timeout_ms = timeout_ms

    @classmethod
    def parse(cls, document: Any) -> "ActionPut":
        if not isinstance(document, dict):
            raise InvalidRequestError(f"{MALFORMED}the action must be a JSON object")
        image = _exec_image(document.get("exec"))
        if document.get("parameters"):
            raise InvalidRequestError(
                "Default parameters of an action are not supported here: send them with each "
                "invocation."
            )
        url, annotations = _annotations(document.get("annotations"))
        return cls(url, image, annotations, _timeout_ms(document.get("limits")))


def _exec_image(exec_: Any) -> str | None:
    if exec_ is None:
        return None
    if not isinstance(exec_, dict):
        raise InvalidRequestError(f"{MALFORMED}exec must be a JSON object")
    kind = exec_.get("kind")
    if kind == "sequence":
        raise InvalidRequestError(
            f"Sequences are not supported here: each action is one HTTP function; "
            f"{HOW_TO_GIVE_A_URL}."
        )
    if "code" in exec_ or kind not in (None, "blackbox"):
        raise InvalidRequestError(CODE_ACTION)
    image = exec_.get("image", "")
    if not isinstance(image, str):
        raise InvalidRequestError(f"{MALFORMED}exec.image must be a string")
    return image


def _annotations(annotations: Any) -> tuple[str | None, dict[str, str] | None]:
    """(url, the other annotations) of a PUT's annotations list; None for what it left out."""
    if annotations is None:
        return None, None
    if not isinstance(annotations, list):
        raise InvalidRequestError(f"{MALFORMED}annotations must be a list of {{key, value}}")
    url = None
    others: dict[str, str] = {}
    for entry in annotations:
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise InvalidRequestError(f"{MALFORMED}annotations must be a list of {{key, value}}")
        key, value = entry["key"], entry.get("value")
        if key == URL_ANNOTATION:
            if not isinstance(value, str):
                raise InvalidRequestError(f"the annotation {URL_ANNOTATION!r} must be a URL")
            url = value
        elif key != "exec":  # ours, shown on every action
            others[key] = value if isinstance(value, str) else orjson.dumps(value).decode()
    return url, others


def _timeout_ms(limits: Any) -> int | None:
    if limits is None:
        return None
    if not isinstance(limits, dict):
        raise InvalidRequestError(f"{MALFORMED}limits must be a JSON object")
    timeout = limits.get("timeout")
    if timeout is None:
        return None
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1:
        raise InvalidRequestError("limits.timeout must be a whole number of milliseconds")
    return timeout


async def ended_within(pending: "asyncio.Task[Any]", wait_s: float) -> bool:
    """Whether ``pending`` ends within ``wait_s``; it runs on either way. (asyncio.wait does
    the same with a third more work: this is on every blocking call.)"""
    if pending.done():
        return True
    waiter = asyncio.get_running_loop().create_future()
    timer = waiter.get_loop().call_later(wait_s, _wake, waiter)
    pending.add_done_callback(functools.partial(_wake, waiter))
    try:
        await waiter
    finally:
        timer.cancel()
    return pending.done()


def _wake(waiter: "asyncio.Future[None]", *_: object) -> None:
    if not waiter.done():
        waiter.set_result(None)


def ended_activation(queued: QueuedCall, call: CallContext, outcome: Outcome) -> Activation:
    """The record of a call made here that ended (its body's place is noted when stored)."""
    activation = Activation.queued(queued)
    activation.start(attempts=1, started_at_ns=call.start_ns)
    activation.finish(outcome)
    return activation


async def read_json_body(
    request: web.Request, limit: int, timeout_s: float, *, allow_empty: bool
) -> Any:
    """A request's JSON body (``{}`` when empty and ``allow_empty``); 400 in OpenWhisk's words
    when it is not JSON, 413 beyond ``limit``."""
    body = await read_body(request, timeout_s, limit)
    if allow_empty and not body.strip():
        return {}
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"{MALFORMED}{exc}") from exc


# query parameters


def is_true(value: str | None) -> bool:
    return value is not None and value.lower() == "true"


def parse_invoke_query(query: Mapping[str, str]) -> tuple[bool, bool, int]:
    """(blocking, result, how long a blocking call waits in ms)."""
    wait_ms = MAX_BLOCKING_WAIT_MS
    raw = query.get("timeout")
    if raw is not None:
        if WHOLE_NUMBER.fullmatch(raw) is None:
            raise InvalidRequestError(INVALID_TIMEOUT)
        wait_ms = int(raw)
        if not 0 < wait_ms <= MAX_BLOCKING_WAIT_MS:
            raise InvalidRequestError(INVALID_TIMEOUT)
    return is_true(query.get("blocking")), is_true(query.get("result")), wait_ms


def _whole_number(query: Mapping[str, str], name: str, collection: str) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    if WHOLE_NUMBER.fullmatch(raw) is None:
        raise InvalidRequestError(f"The value '{raw}' is not an integer for {collection}.")
    return int(raw)


def parse_limit(query: Mapping[str, str], collection: str) -> int:
    """``limit``: default 30, 0 for the most (200), more than that a 400 (OpenWhisk's)."""
    limit = _whole_number(query, "limit", collection)
    if limit is None:
        return DEFAULT_LIST_LIMIT
    if not 0 <= limit <= MAX_LIST_LIMIT:
        raise InvalidRequestError(
            f"The value '{limit}' is not in the range of 0 to {MAX_LIST_LIMIT} for {collection}."
        )
    return limit or MAX_LIST_LIMIT


def parse_skip(query: Mapping[str, str], collection: str) -> int:
    skip = _whole_number(query, "skip", collection)
    if skip is None:
        return 0
    if skip < 0:
        raise InvalidRequestError(
            f"The value '{skip}' is not greater than or equal to 0 for {collection}."
        )
    return skip


def parse_epoch_ms(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 16:
        raise InvalidRequestError(f"Parameter is not a valid value for epoch milliseconds: {raw}")
    return int(raw) * 1_000_000


def parse_name_filter(raw: str | None) -> str | None:
    """``name``: an action or ``package/action``, as the function it names."""
    if not raw:
        return None
    package, _, action = raw.rpartition("/")
    name = function_name(package or None, action)
    if raw.count("/") > 1 or not action or not is_valid_function_name(name):
        raise InvalidRequestError(
            f"Parameter may be a 'simple' name or 'package-name/simple' name: {raw}"
        )
    return name


def answer_within_s(wait_ms: int) -> float:
    """How long a blocking call waits before its 202: ``timeout`` less a tenth (at most
    100 ms), so that a client whose own read timeout is that same ``timeout`` (APISIX's
    openwhisk plugin sets both from one value) gets the 202 before it gives up on us."""
    return (wait_ms - min(EARLY_ANSWER_MS, wait_ms / 10)) / 1000


# answers


def accepted(activation_id: str) -> web.Response:
    """202 ``{"activationId"}``: queued, or still running after a blocking wait."""
    response = _json(202, {"activationId": activation_id})
    response.headers[ACTIVATION_ID_HEADER] = activation_id
    return response


def _json(status: int, document: Any) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(document, option=orjson.OPT_APPEND_NEWLINE),
        content_type="application/json",
    )


def _parsed(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"{MALFORMED}{exc}") from exc
