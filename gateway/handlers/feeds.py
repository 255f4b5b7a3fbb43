"""Feeds: the built-in feed actions of the ``/whisk.system`` namespace, and the lifecycle of a
trigger's feed, built-in or a user's feed action.

A feed action gets OpenWhisk's feed protocol: ``lifecycleEvent`` (CREATE, READ, UPDATE,
DELETE, PAUSE, UNPAUSE), ``triggerName`` (``/ns/name``), ``authKey`` and the feed's
parameters. The built-in ones (``alarms/alarm``, ``alarms/interval``, ``alarms/once``,
``nats/subject``) run here and keep their state in the feeds bucket, which every gateway
watches: the scheduler (gateway/events/scheduler.py) and the subject feeds
(gateway/events/subjects.py) act on it. A user's feed action is any function, called blocking
(gateway/handlers/openwhisk.py ``OpenWhisk.call_blocking``).

A built-in feed answers as an action would: ``{"status": "success"}`` (READ: its ``config``
and ``status``), or an application error ``{"error": "..."}`` (502 to a blocking invoke),
as OpenWhisk's alarms package answers. These invocations keep no activation record.
"""

import time
from typing import Any

import orjson
from aiohttp import web

from faas_gateway.core.call import QueuedCall
from faas_gateway.core.events import InvalidEntityError, entity_reference
from faas_gateway.core.feeds import (
    BUILTIN_FEEDS,
    BUILTIN_NAMESPACE,
    CREATE,
    DELETE,
    LIFECYCLE_EVENTS,
    PARAMETERS,
    PAUSE,
    READ,
    UNPAUSE,
    UPDATE,
    FeedError,
    FeedState,
    configure,
)
from faas_gateway.core.functions import FunctionSpec, Registry
from faas_gateway.core.openwhisk import (
    APPLICATION_ERROR,
    HTTP_STATUS,
    SUCCESS,
    VERSION,
    function_name,
)
from faas_gateway.nats.buckets import (
    DocumentChangedError,
    DocumentExistsError,
    DocumentNotFoundError,
)
from faas_gateway.nats.events import EventStore, EventWatch
from gateway.errors import InvalidRequestError, NotFoundError, UpstreamUnavailableError
from gateway.handlers.openwhisk import (
    ACTIVATION_ID_HEADER,
    MALFORMED,
    OpenWhisk,
    accepted,
    parse_invoke_query,
    read_json_body,
)
from gateway.request import CallContext, new_call_id

MAX_FEED_PARAMS_BYTES = 64 * 1024
SUCCEEDED = {"status": "success"}
DESCRIPTIONS = {
    "alarms/alarm": "Fire trigger when alarm occurs (cron)",
    "alarms/interval": "Fire trigger at specified interval",
    "alarms/once": "Fire trigger once when alarm occurs",
    "nats/subject": "Fire trigger for each message on a NATS subject",
}


class Feeds:
    def __init__(
        self,
        store: EventStore,
        watch: EventWatch,
        registry: Registry,
        whisk: OpenWhisk,
        *,
        namespace: str,
        spaces: list[str],
        body_timeout_s: float,
    ) -> None:
        self._store = store
        self._watch = watch
        self._registry = registry
        self._whisk = whisk
        self._namespace = namespace
        self._spaces = spaces
        self._body_timeout_s = body_timeout_s

    # the built-in feed actions: /api/v1/namespaces/whisk.system/actions/{package}/{name}

    async def get_builtin(self, request: web.Request) -> web.Response:
        feed = _builtin(request)
        package, name = feed.split("/")
        return _json(
            200,
            {
                "namespace": f"{BUILTIN_NAMESPACE}/{package}",
                "name": name,
                "version": VERSION,
                "publish": True,
                "exec": {"kind": "builtin", "binary": False},
                "annotations": [
                    {"key": "feed", "value": True},
                    {"key": "description", "value": DESCRIPTIONS[feed]},
                    {
                        "key": "parameters",
                        "value": [{"name": parameter} for parameter in PARAMETERS[feed]],
                    },
                ],
                "parameters": [],
                "limits": {},
            },
        )

    async def invoke_builtin(self, request: web.Request) -> web.Response:
        """An invocation of a built-in feed, as the npm client's ``feeds.create`` and wsk's
        ``trigger create --feed`` send it: blocking, with the lifecycle event."""
        feed = _builtin(request)
        blocking, result_only, _ = parse_invoke_query(request.rel_url.query)
        params = await read_json_body(
            request, MAX_FEED_PARAMS_BYTES, self._body_timeout_s, allow_empty=True
        )
        if not isinstance(params, dict):
            raise InvalidRequestError(f"{MALFORMED}the parameters must be a JSON object")
        activation_id = new_call_id()
        start_ms = int(time.time() * 1000)
        try:
            result = await self.run_builtin(feed, params)
            status = SUCCESS
        except FeedError as exc:
            result, status = {"error": str(exc)}, APPLICATION_ERROR
        if not blocking:
            return accepted(activation_id)
        response = {"status": status, "success": status == SUCCESS, "result": result}
        end_ms = int(time.time() * 1000)
        name = feed.split("/")[1]
        document: Any = result
        if not result_only:
            document = {
                "namespace": self._namespace,
                "name": name,
                "version": VERSION,
                "subject": self._namespace,
                "publish": False,
                "activationId": activation_id,
                "start": start_ms,
                "end": end_ms,
                "duration": end_ms - start_ms,
                "response": response,
                "logs": [],
                "annotations": [
                    {"key": "path", "value": f"{BUILTIN_NAMESPACE}/{feed}"},
                    {"key": "kind", "value": "builtin"},
                ],
            }
        answer = _json(HTTP_STATUS[status], document)
        answer.headers[ACTIVATION_ID_HEADER] = activation_id
        return answer

    async def run_builtin(self, feed: str, params: dict[str, Any]) -> dict[str, Any]:
        """One lifecycle event of a built-in feed; FeedError with OpenWhisk's words when its
        parameters cannot be taken."""
        event = str(params.get("lifecycleEvent") or "").upper()
        if event not in LIFECYCLE_EVENTS:
            raise FeedError(
                f"unsupported lifecycleEvent {params.get('lifecycleEvent')!r}: one of "
                + ", ".join(LIFECYCLE_EVENTS)
            )
        trigger = self._trigger_name(params.get("triggerName"))
        now_ms = int(time.time() * 1000)
        stored = await self._store.feeds.get(trigger)
        current = _state(stored[0]) if stored else None
        if event == CREATE:
            return await self._create(feed, trigger, params, now_ms, current)
        if stored is None or current is None or current.feed != feed:
            raise FeedError(f"trigger /{self._namespace}/{trigger} has no {feed} feed")
        revision = stored[1]
        if event == READ:
            return current.read_document(self._namespace, now_ms)
        if event == DELETE:
            try:
                deleted = await self._store.feeds.delete(trigger, revision)
            except DocumentChangedError as exc:
                raise FeedError(str(exc)) from exc
            self._watch.feeds.apply(trigger, deleted, None)
            return SUCCEEDED
        if event == UPDATE:
            state = configure(feed, trigger, params, now_ms, self._spaces, before=current)
        else:
            state = current.paused(event == UNPAUSE, now_ms)
            assert event in (PAUSE, UNPAUSE)
        try:
            updated = await self._store.feeds.update(trigger, state.to_json(), revision)
        except DocumentChangedError as exc:
            raise FeedError(str(exc)) from exc
        self._watch.feeds.apply(trigger, updated, state)
        return SUCCEEDED

    async def _create(
        self,
        feed: str,
        trigger: str,
        params: dict[str, Any],
        now_ms: int,
        current: FeedState | None,
    ) -> dict[str, Any]:
        if self._watch.triggers.get(trigger) is None and not await self._store.triggers.get(
            trigger
        ):
            raise FeedError(f"trigger /{self._namespace}/{trigger} does not exist")
        state = configure(feed, trigger, params, now_ms, self._spaces)
        if current is not None:
            if current.same_setup(state):
                return SUCCEEDED  # the same CREATE again (wsk and the gateway both sent it)
            raise FeedError(
                f"trigger /{self._namespace}/{trigger} has a feed already ({current.feed}); "
                "delete it first"
            )
        try:
            revision = await self._store.feeds.create(trigger, state.to_json())
        except DocumentExistsError as exc:
            raise FeedError(
                f"trigger /{self._namespace}/{trigger} has a feed already; delete it first"
            ) from exc
        self._watch.feeds.apply(trigger, revision, state)
        return SUCCEEDED

    def _trigger_name(self, value: Any) -> str:
        if not value:
            raise FeedError("no trigger name parameter was provided")
        try:
            package, name = entity_reference(value, self._namespace, "trigger")
        except InvalidEntityError as exc:
            raise FeedError(str(exc)) from exc
        if package is not None:
            raise FeedError(f"trigger {value} does not exist")
        return name

    # a trigger's feed, as its annotation "feed" names it

    def feed_action(self, reference: str) -> str | FunctionSpec:
        """The built-in feed (its name) or the function a ``feed`` annotation names; 400 when
        there is none."""
        builtin = f"/{BUILTIN_NAMESPACE}/"
        if reference.startswith(builtin):
            name = reference[len(builtin) :]
            if name in BUILTIN_FEEDS:
                return name
            raise InvalidRequestError(f"feed action {reference} does not exist")
        try:
            package, action = entity_reference(reference, self._namespace, "feed action")
        except InvalidEntityError as exc:
            raise InvalidRequestError(f"feed action {reference}: {exc}") from exc
        function = self._registry.get(function_name(package, action))
        if function is None:
            raise InvalidRequestError(f"feed action {reference} does not exist")
        return function

    async def lifecycle(
        self,
        reference: str,
        event: str,
        trigger: str,
        params: dict[str, Any],
        auth_key: str,
    ) -> dict[str, Any]:
        """Tell a trigger's feed action of ``event``: a built-in one runs here (400 when its
        parameters cannot be taken), a user's is called blocking (502 when it fails)."""
        target = self.feed_action(reference)
        body = {
            **params,
            "lifecycleEvent": event,
            "triggerName": f"/{self._namespace}/{trigger}",
            "authKey": auth_key,
        }
        if isinstance(target, str):
            try:
                return await self.run_builtin(target, body)
            except FeedError as exc:
                raise InvalidRequestError(f"feed {reference}: {exc}") from exc
        call = CallContext(new_call_id())
        queued = QueuedCall(
            call_id=call.call_id,
            function=target.name,
            method="POST",
            path="",
            query="",
            headers=[("Content-Type", "application/json")],
            body=orjson.dumps(body),
            callback_url=None,
            accepted_at_ns=call.start_ns,
        )
        outcome = await self._whisk.call_blocking(queued, target, call, record=True)
        response = self._whisk.result_of(outcome)
        result: dict[str, Any] = dict(response["result"])
        if not response["success"]:
            error = result.get("error", result)
            said = error if isinstance(error, str) else orjson.dumps(error).decode()
            raise UpstreamUnavailableError(
                f"feed action {reference} failed on {event} ({response['status']}, activation "
                f"{call.call_id}): {said}"
            )
        return result

    async def forget(self, trigger: str) -> None:
        """Remove a deleted trigger's built-in feed, if it has one, so nothing fires it."""
        stored = await self._store.feeds.get(trigger)
        if stored is None:
            return
        try:
            revision = await self._store.feeds.delete(trigger, stored[1])
        except (DocumentChangedError, DocumentNotFoundError):
            return
        self._watch.feeds.apply(trigger, revision, None)


def _builtin(request: web.Request) -> str:
    feed = f"{request.match_info['package']}/{request.match_info['name']}"
    if feed not in BUILTIN_FEEDS:
        raise NotFoundError(f"no action /{BUILTIN_NAMESPACE}/{feed}")
    return feed


def _state(document: dict[str, Any]) -> FeedState | None:
    try:
        return FeedState.from_json(document)
    except (KeyError, TypeError, ValueError):
        return None


def _json(status: int, document: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(document), content_type="application/json")
