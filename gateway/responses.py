"""Answers that more than one route gives: a call accepted, a record, a finished call's result.

Every JSON body the gateway makes ends with a newline, so that curl's output of one call does
not run into the next prompt; a finished call's result is the function's, as it sent it.
"""

import json

from aiohttp import web

from faas_gateway.core.headers import CALL_ID
from faas_gateway.nats.activations import Activation, ActivationStore, StoredActivation
from gateway.request import PREFERENCE_APPLIED

RESULT_TRUNCATED = "X-Result-Truncated"
# How soon a client polling an unfinished call should ask again.
RETRY_AFTER_S = 1


def location_of(call_id: str) -> str:
    return f"/system/activations/{call_id}"


def accepted(call_id: str) -> web.Response:
    """202: the call is queued (or runs on); ``{"callId"}`` and where to follow it."""
    response = web.Response(
        status=202,
        body=(json.dumps({"callId": call_id}) + "\n").encode(),
        content_type="application/json",
    )
    response.headers["Location"] = location_of(call_id)
    return response


def record_response(stored: StoredActivation, status: int = 200) -> web.Response:
    response = web.Response(
        status=status, body=stored.record_json + b"\n", content_type="application/json"
    )
    response.headers[CALL_ID] = str(stored.record.get("callId"))
    return response


def unfinished_response(stored: StoredActivation) -> web.Response:
    """202 for a call still queued or running: where to look, when to look again."""
    response = record_response(stored, status=202)
    response.headers["Location"] = location_of(str(stored.record.get("callId")))
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


async def result_response(records: ActivationStore, stored: StoredActivation) -> web.Response:
    """A finished call's response as the function returned it: status, Content-Type, body."""
    activation = Activation.from_stored(stored)
    outcome = activation.outcome(await records.result_body(stored))
    response = web.Response(status=outcome.status_code, body=outcome.body)
    content_type = outcome.content_type()
    if content_type:
        response.headers["Content-Type"] = content_type
    response.headers[CALL_ID] = activation.call_id
    if (activation.response or {}).get("truncated"):
        response.headers[RESULT_TRUNCATED] = "true"
    return response


async def waited_response(
    records: ActivationStore,
    call_id: str,
    wait_s: float,
    *,
    applied_to_result: str | None = None,
    applied_to_unfinished: str | None = None,
) -> web.StreamResponse:
    """Prefer: wait=N: the result if the call finishes within N seconds, else a 202 (with the
    record, when it can be read), each with its Preference-Applied, if any."""
    stored = await records.wait_until_final(call_id, wait_s)
    applied = applied_to_unfinished
    if stored is None:
        response: web.StreamResponse = accepted(call_id)
    elif stored.is_final:
        response = await result_response(records, stored)
        applied = applied_to_result
    else:
        response = unfinished_response(stored)
    if applied is not None:
        response.headers[PREFERENCE_APPLIED] = applied
    return response
