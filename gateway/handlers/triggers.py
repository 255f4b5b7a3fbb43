"""OpenWhisk's triggers and rules under /api/v1: create, read, list, update, delete, fire,
enable and disable, in OpenWhisk's shapes (faas_gateway/core/events.py).

They are kept in NATS key-value buckets that every gateway watches
(faas_gateway/nats/events.py); a write is made over the revision read, and applied to this
process's copy at once. A fire with at least one active rule is written once to the fire
stream (gateway/events/fires.py) and answered 202 after JetStream's ack; the rules' actions
are queued from there (gateway/events/fanout.py). docs/events.md has the whole.
"""

import base64
import binascii
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import orjson
from aiohttp import web
from multidict import MultiMapping

from faas_gateway.core.events import (
    SOURCE_API,
    STATUSES,
    Rule,
    RulePut,
    Trigger,
    TriggerPut,
    check_entity_name,
    rule_document,
    trigger_document,
)
from faas_gateway.core.feeds import CREATE, DELETE, UPDATE
from faas_gateway.core.functions import Registry
from faas_gateway.core.openwhisk import action_name, action_namespace
from faas_gateway.nats.buckets import DocumentChangedError, DocumentExistsError
from faas_gateway.nats.events import EventStore, EventWatch
from gateway.errors import (
    MAPPED_ERRORS,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
)
from gateway.events.fires import Fires
from gateway.handlers.enqueue import read_body_within, too_large_for_async
from gateway.handlers.feeds import Feeds
from gateway.handlers.openwhisk import (
    MALFORMED,
    accepted,
    is_true,
    parse_limit,
    parse_skip,
    read_json_body,
)
from gateway.handlers.sync import WholeRequest
from gateway.queue import GatewayQueue

log = logging.getLogger("faas.events")

MAX_ENTITY_BODY_BYTES = 256 * 1024
# Request headers never passed on to an action in __ow_headers: the API key.
WITHHELD_HEADERS = frozenset({"authorization", "proxy-authorization"})


class Triggers:
    def __init__(
        self,
        store: EventStore,
        watch: EventWatch,
        registry: Registry,
        feeds: Feeds,
        fires: Fires,
        queue: GatewayQueue,
        *,
        namespace: str,
        body_timeout_s: float,
    ) -> None:
        self._store = store
        self._watch = watch
        self._registry = registry
        self._feeds = feeds
        self._fires = fires
        self._queue = queue
        self._namespace = namespace
        self._namespaces = frozenset({"_", namespace})
        self._body_timeout_s = body_timeout_s

    # triggers

    async def list_triggers(self, request: web.Request) -> web.Response:
        self._check_namespace(request)
        triggers = self._watch.triggers.entries.values()
        return _listing(request, "triggers", triggers, self._trigger_document)

    async def get_trigger(self, request: web.Request) -> web.Response:
        return _json(200, self._trigger_document(self._trigger(request)))

    async def put_trigger(self, request: web.Request) -> web.Response:
        """Create (409 if it exists, unless ``overwrite=true``) or update a trigger. With a
        ``feed`` annotation and parameters, the feed action is told (CREATE or UPDATE) with
        them, and they are the feed's, not the trigger's (as ``wsk trigger create --feed``
        gives them); a feed that refuses leaves no trigger behind."""
        self._check_namespace(request)
        name = check_entity_name(request.match_info["name"], "trigger")
        overwrite = is_true(request.rel_url.query.get("overwrite"))
        put = TriggerPut.parse(await self._read_json(request))
        before = self._watch.triggers.get(name)
        if before is not None and not overwrite:
            raise ConflictError("resource already exists")
        if before is None and overwrite:
            stored = await self._store.triggers.get(name)
            if stored is not None:  # made through another gateway, not seen here yet
                before = Trigger.from_json(stored[0])
        feed_params = None
        made = put.made(name, _now_ms(), before)
        feed = made.feed
        if feed is not None:
            if before is not None and before.feed != feed:
                raise InvalidRequestError(
                    "the feed of a trigger cannot change: delete the trigger and create it again"
                )
            self._feeds.feed_action(feed)  # 400 now for one that does not exist
            if put.parameters:
                feed_params = {str(pair["key"]): pair.get("value") for pair in put.parameters}
                made = replace(made, parameters=before.parameters if before else ())
        if before is None:
            try:
                await self._create_trigger(made)
            except DocumentExistsError:  # made meanwhile, through another gateway
                if not overwrite:
                    raise
                await self._update_trigger(made)
            if feed is not None and feed_params is not None:
                await self._configure_new_feed(request, made, feed, feed_params)
        else:
            if feed is not None and feed_params is not None:
                await self._feeds.lifecycle(feed, UPDATE, name, feed_params, _auth_key(request))
            await self._update_trigger(made)
        return _json(200, self._trigger_document(made))

    async def _configure_new_feed(
        self, request: web.Request, trigger: Trigger, feed: str, params: dict[str, Any]
    ) -> None:
        try:
            await self._feeds.lifecycle(feed, CREATE, trigger.name, params, _auth_key(request))
        except MAPPED_ERRORS:
            # Nothing half-done: the trigger made for the feed goes again.
            try:
                await self._remove_trigger(trigger.name)
            except MAPPED_ERRORS as exc:
                log.warning("trigger %s left after its feed failed: %s", trigger.name, exc)
            raise

    async def delete_trigger(self, request: web.Request) -> web.Response:
        """Delete a trigger, answering it as it was. A feed action it names is told (DELETE;
        what it answers does not stop the delete: a trigger whose feed action is gone must
        still go), and a built-in feed of it stops."""
        trigger = self._trigger(request)
        document = self._trigger_document(trigger)
        if trigger.feed is not None:
            try:
                await self._feeds.lifecycle(
                    trigger.feed, DELETE, trigger.name, {}, _auth_key(request)
                )
            except MAPPED_ERRORS as exc:
                log.warning("trigger %s: its feed's DELETE: %s", trigger.name, exc)
        await self._remove_trigger(trigger.name)
        return _json(200, document)

    async def delete_after_fire(self, name: str, with_rules: bool) -> None:
        """alarms/once with deleteAfterFire: the trigger (and with "rules" its rules) goes."""
        try:
            if with_rules:
                for rule in list(self._watch.rules_of(name)):
                    await self._remove_rule(rule.name)
            await self._remove_trigger(name)
        except MAPPED_ERRORS as exc:
            log.warning("trigger %s not deleted after its alarm fired: %s", name, exc)

    async def _create_trigger(self, trigger: Trigger) -> None:
        revision = await self._store.triggers.create(trigger.name, trigger.to_json())
        self._watch.triggers.apply(trigger.name, revision, trigger)

    async def _update_trigger(self, trigger: Trigger) -> None:
        stored = await self._store.triggers.get(trigger.name)
        if stored is None:  # deleted meanwhile: overwrite makes it again
            await self._create_trigger(trigger)
            return
        revision = await self._store.triggers.update(trigger.name, trigger.to_json(), stored[1])
        self._watch.triggers.apply(trigger.name, revision, trigger)

    async def _remove_trigger(self, name: str) -> None:
        await self._feeds.forget(name)
        stored = await self._store.triggers.get(name)
        if stored is None:
            self._watch.triggers.drop(name)  # gone already; its delete is on its way here
            return
        revision = await self._store.triggers.delete(name, stored[1])
        self._watch.triggers.apply(name, revision, None)

    # firing

    async def fire(self, request: web.Request) -> web.Response:
        """202 ``{"activationId"}`` once the fire is in the fire stream, with at least one
        active rule; 204, with nothing stored, without one."""
        trigger = self._trigger(request)
        self._queue.raise_unless_ready()
        body = await read_body_within(request, self._queue.max_body_bytes(), self._body_timeout_s)
        return await self._fire(trigger, body, request.headers)

    def takes_fire_whole(self, namespace: str, name: str, body_length: int) -> bool:
        """Whether the lean server (gateway/invocation_server.py) may take this fire whole:
        a trigger that exists, a queue that is ready and a body within its limit. Anything
        else goes to ``fire`` through aiohttp, which answers the 404, 503 or 413."""
        return (
            namespace in self._namespaces
            and self._watch.triggers.get(name) is not None
            and self._queue.is_ready
            and body_length <= self._queue.max_body_bytes()
        )

    async def fire_whole(self, name: str, request: WholeRequest) -> web.Response:
        """A fire the lean server took whole (``takes_fire_whole``): the same steps as fire."""
        trigger = self._watch.triggers.get(name)
        if trigger is None:  # deleted since
            raise NotFoundError(f"no trigger {name[:300]!r}")
        self._queue.raise_unless_ready()
        if request.body_length > self._queue.max_body_bytes():
            raise too_large_for_async(self._queue.max_body_bytes())
        return await self._fire(trigger, await request.body() or b"", request.headers)

    async def _fire(
        self, trigger: Trigger, body: bytes, incoming: MultiMapping[str]
    ) -> web.Response:
        payload: Any = {}
        if body.strip():
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise InvalidRequestError(f"{MALFORMED}{exc}") from exc
        if not isinstance(payload, dict):
            raise InvalidRequestError(f"{MALFORMED}the payload must be a JSON object")
        headers = {
            key.lower(): value
            for key, value in incoming.items()
            if key.lower() not in WITHHELD_HEADERS
        }
        fire = self._fires.of_trigger(trigger, payload, source=SOURCE_API, headers=headers)
        if fire is None:
            return web.Response(status=204)
        await self._fires.publish(fire)
        return accepted(fire.fire_id)

    # rules

    async def list_rules(self, request: web.Request) -> web.Response:
        self._check_namespace(request)
        rules = self._watch.rules.entries.values()
        return _listing(request, "rules", rules, lambda rule: rule_document(rule, self._namespace))

    async def get_rule(self, request: web.Request) -> web.Response:
        return _json(200, rule_document(self._rule(request), self._namespace))

    async def put_rule(self, request: web.Request) -> web.Response:
        """Create (409 if it exists, unless ``overwrite=true``) or update a rule; its trigger
        and its action must exist (400). A new rule is active; an update keeps its status."""
        self._check_namespace(request)
        name = check_entity_name(request.match_info["name"], "rule")
        overwrite = is_true(request.rel_url.query.get("overwrite"))
        put = RulePut.parse(await self._read_json(request), self._namespace)
        before = self._watch.rules.get(name)
        if before is not None and not overwrite:
            raise ConflictError("resource already exists")
        if self._watch.triggers.get(put.trigger) is None:
            raise InvalidRequestError(f"trigger /{self._namespace}/{put.trigger} does not exist")
        if self._registry.get(put.action) is None:
            action = action_name(put.action)[1]
            path = action_namespace(self._namespace, put.action)
            raise InvalidRequestError(f"action /{path}/{action} does not exist")
        stored = None if before is None and not overwrite else await self._store.rules.get(name)
        if stored is not None and before is None:  # made through another gateway meanwhile
            before = Rule.from_json(stored[0])
        rule = put.made(name, _now_ms(), before)
        if stored is None:
            revision = await self._store.rules.create(name, rule.to_json())
        else:
            revision = await self._store.rules.update(name, rule.to_json(), stored[1])
        self._watch.rules.apply(name, revision, rule)
        return _json(200, rule_document(rule, self._namespace))

    async def set_rule_status(self, request: web.Request) -> web.Response:
        """``{"status": "active"|"inactive"}``: 200 with the rule, changed or already so."""
        rule = self._rule(request)
        document = await self._read_json(request)
        status = document.get("status") if isinstance(document, dict) else None
        if status not in STATUSES:
            raise InvalidRequestError("status must be 'active' or 'inactive'")
        if self._watch.triggers.get(rule.trigger) is None:
            raise NotFoundError("Only rules with existing triggers can be activated")
        if rule.status != status:
            stored = await self._store.rules.get(rule.name)
            if stored is None:
                raise NotFoundError(f"no rule {rule.name!r}")
            rule = rule.with_status(str(status), _now_ms())
            try:
                revision = await self._store.rules.update(rule.name, rule.to_json(), stored[1])
            except DocumentChangedError as exc:
                raise ConflictError(str(exc)) from exc
            self._watch.rules.apply(rule.name, revision, rule)
        return _json(200, rule_document(rule, self._namespace))

    async def delete_rule(self, request: web.Request) -> web.Response:
        """Delete a rule, answering it with status inactive (as OpenWhisk)."""
        rule = self._rule(request)
        await self._remove_rule(rule.name)
        return _json(200, rule_document(rule, self._namespace, status="inactive"))

    async def _remove_rule(self, name: str) -> None:
        stored = await self._store.rules.get(name)
        if stored is None:
            self._watch.rules.drop(name)  # gone already; its delete is on its way here
            return
        revision = await self._store.rules.delete(name, stored[1])
        self._watch.rules.apply(name, revision, None)

    # helpers

    def _check_namespace(self, request: web.Request) -> None:
        if request.match_info["namespace"] not in self._namespaces:
            raise NotFoundError(f"no namespace {request.match_info['namespace']!r}")

    def _trigger(self, request: web.Request) -> Trigger:
        self._check_namespace(request)
        name = request.match_info["name"]
        trigger = self._watch.triggers.get(name)
        if trigger is None:
            raise NotFoundError(f"no trigger {name[:300]!r}")
        return trigger

    def _rule(self, request: web.Request) -> Rule:
        self._check_namespace(request)
        name = request.match_info["name"]
        rule = self._watch.rules.get(name)
        if rule is None:
            raise NotFoundError(f"no rule {name[:300]!r}")
        return rule

    def _trigger_document(self, trigger: Trigger) -> dict[str, Any]:
        return trigger_document(trigger, self._namespace, self._watch.rules_of(trigger.name))

    async def _read_json(self, request: web.Request) -> Any:
        return await read_json_body(
            request, MAX_ENTITY_BODY_BYTES, self._body_timeout_s, allow_empty=True
        )


def _auth_key(request: web.Request) -> str:
    """The caller's API key (``user:password`` of its Basic auth), which OpenWhisk's feed
    protocol hands to the feed action as ``authKey``; empty without one."""
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        return base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _json(status: int, document: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(document), content_type="application/json")


class _Named(Protocol):
    @property
    def name(self) -> str: ...


NamedT = TypeVar("NamedT", bound=_Named)


def _listing(
    request: web.Request,
    collection: str,
    entries: Iterable[NamedT],
    document: Callable[[NamedT], dict[str, Any]],
) -> web.Response:
    """A collection's GET, as OpenWhisk's: by name, ``skip`` and ``limit``, or ``count=true``
    for how many there are past ``skip``."""
    query = request.rel_url.query
    skip, limit = parse_skip(query, collection), parse_limit(query, collection)
    ordered = sorted(entries, key=lambda entry: entry.name)
    if is_true(query.get("count")):
        return _json(200, {collection: max(0, len(ordered) - skip)})
    return _json(200, [document(entry) for entry in ordered[skip:][:limit]])
