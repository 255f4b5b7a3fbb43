"""OpenWhisk's shapes, as tables: a function's answer as a result, an ended call's status,
action names with packages, the query parameters of invokes and listings, and the record
fields added for them."""

import base64

import pytest

from faas_gateway.core.openwhisk import (
    APPLICATION_ERROR,
    DEVELOPER_ERROR,
    INTERNAL_ERROR,
    SUCCESS,
    action_name,
    action_path,
    activation_response,
    activation_status,
    function_name,
    result_bytes,
    result_of,
)
from faas_gateway.core.outcome import (
    FAILED_BY_FUNCTION,
    FAILED_BY_GATEWAY,
    FAILED_BY_TIMEOUT,
    Outcome,
    failure,
)
from faas_gateway.nats.activations import Activation, StoredActivation
from gateway.errors import InvalidRequestError
from gateway.handlers.openwhisk import (
    answer_within_s,
    parse_invoke_query,
    parse_limit,
    parse_name_filter,
)

JSON = [("Content-Type", "application/json")]


@pytest.mark.parametrize(
    ("status_code", "headers", "body", "result"),
    [
        (200, JSON, b'{"a": 1}', {"a": 1}),
        (500, JSON, b' {"error": "boom"}', {"error": "boom"}),
        (200, [("Content-Type", "text/plain")], b'{"a": 1}', {"a": 1}),  # any JSON object
        (
            200,
            JSON,
            b"[1, 2]",
            {"statusCode": 200, "headers": {"Content-Type": "application/json"}, "body": "[1, 2]"},
        ),
        (
            201,
            JSON,
            b"42",
            {"statusCode": 201, "headers": {"Content-Type": "application/json"}, "body": "42"},
        ),
        (204, [], b"", {"statusCode": 204, "headers": {}, "body": ""}),
        (
            200,
            [("Content-Type", "text/plain"), ("Content-Length", "2"), ("Date", "x")],
            b"hi",
            {"statusCode": 200, "headers": {"Content-Type": "text/plain"}, "body": "hi"},
        ),
        (
            200,
            [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")],
            b"{not json",
            {"statusCode": 200, "headers": {"Set-Cookie": ["a=1", "b=2"]}, "body": "{not json"},
        ),
        (
            200,
            [],
            b"\xff\x00",
            {"statusCode": 200, "headers": {}, "body": base64.b64encode(b"\xff\x00").decode()},
        ),
    ],
)
def test_a_json_object_is_the_result_and_any_other_answer_is_wrapped(
    status_code: int, headers: list[tuple[str, str]], body: bytes, result: dict[str, object]
) -> None:
    assert result_of(status_code, headers, body) == result


def test_a_result_that_is_the_body_is_answered_byte_for_byte() -> None:
    body = b'{ "b":2,  "a": 1 }'
    assert result_bytes(result_of(200, JSON, body)) == body
    assert result_bytes({"error": "x"}) == b'{"error":"x"}'


@pytest.mark.parametrize(
    ("finished", "failed_by", "body_size", "cut", "status"),
    [
        ("succeeded", None, 10, False, SUCCESS),
        ("failed", FAILED_BY_FUNCTION, 10, False, APPLICATION_ERROR),
        ("failed", None, 10, False, APPLICATION_ERROR),  # a record from before failedBy
        ("failed", FAILED_BY_TIMEOUT, 10, False, DEVELOPER_ERROR),
        ("failed", FAILED_BY_GATEWAY, 10, False, INTERNAL_ERROR),
        ("cancelled", None, 0, False, INTERNAL_ERROR),
        ("succeeded", None, 101, False, APPLICATION_ERROR),  # over the result limit
        ("succeeded", None, 10, True, APPLICATION_ERROR),  # only partly kept
    ],
)
def test_the_status_of_every_ending(
    finished: str, failed_by: str | None, body_size: int, cut: bool, status: str
) -> None:
    assert activation_status(finished, failed_by, body_size, cut, 100) == status


def test_results_of_failures_and_of_answers_over_the_limit() -> None:
    def response(**given: object) -> dict[str, object]:
        values: dict[str, object] = {
            "finished": "failed",
            "failed_by": FAILED_BY_TIMEOUT,
            "error": "too slow",
            "status_code": 504,
            "headers": JSON,
            "body": b'{"error": "too slow"}',
            "body_size": 21,
            "cut": False,
            "max_result_bytes": 100,
        }
        values.update(given)
        return activation_response(**values)  # type: ignore[arg-type]

    assert response() == {
        "status": DEVELOPER_ERROR,
        "success": False,
        "result": {"error": "too slow"},
    }
    assert response(finished="succeeded", failed_by=None, body_size=150)["result"] == {
        "error": "The action produced a response that exceeded the allowed length: 150 > 100 bytes."
    }


@pytest.mark.parametrize(
    ("package", "action", "function"),
    [(None, "echo", "echo"), ("pkg", "hello", "pkg__hello")],
)
def test_actions_of_packages_are_functions_named_package__action(
    package: str | None, action: str, function: str
) -> None:
    assert function_name(package, action) == function
    assert action_name(function) == (package, action)


def test_names_with_no_package_part_stay_whole() -> None:
    assert action_name("__x") == (None, "__x")
    assert action_name("x__") == (None, "x__")
    assert action_path("guest", "pkg__hello") == "guest/pkg/hello"


@pytest.mark.parametrize(
    ("query", "parsed"),
    [
        ({}, (False, False, 60_000)),
        ({"blocking": "true", "result": "true", "timeout": "3000"}, (True, True, 3000)),
        ({"blocking": "TRUE", "result": "false", "timeout": "60000"}, (True, False, 60_000)),
        ({"blocking": "yes", "timeout": "1"}, (False, False, 1)),
    ],
)
def test_invoke_flags_parse_as_true_and_timeout_as_milliseconds(
    query: dict[str, str], parsed: tuple[bool, bool, int]
) -> None:
    assert parse_invoke_query(query) == parsed


def test_a_blocking_call_answers_its_202_a_little_before_its_timeout() -> None:
    assert answer_within_s(3000) == pytest.approx(2.9)
    assert answer_within_s(60_000) == pytest.approx(59.9)
    assert answer_within_s(50) == pytest.approx(0.045)
    assert 0 < answer_within_s(1) < 0.001


@pytest.mark.parametrize(("raw", "limit"), [(None, 30), ("0", 200), ("200", 200), ("7", 7)])
def test_list_limits(raw: str | None, limit: int) -> None:
    assert parse_limit({} if raw is None else {"limit": raw}, "activations") == limit


@pytest.mark.parametrize("raw", ["201", "-1", "x", "1.5"])
def test_list_limits_out_of_range_are_400(raw: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_limit({"limit": raw}, "activations")


def test_name_filters_name_actions_and_packaged_actions() -> None:
    assert parse_name_filter("echo") == "echo"
    assert parse_name_filter("pkg/hello") == "pkg__hello"
    assert parse_name_filter(None) is None
    for bad in ("a/b/c", "pkg/", "has space"):
        with pytest.raises(InvalidRequestError):
            parse_name_filter(bad)


def test_records_keep_failed_by_and_logs_and_older_records_read_as_before() -> None:
    older = StoredActivation.decode(
        b'{"callId": "c1", "function": "f", "status": "failed", "queuedAt": '
        b'"2026-11-23T08:00:00.000Z", "request": {}, "statusCode": 500}\nbody'
    )
    activation = Activation.from_stored(older)
    assert (activation.failed_by, activation.logs) == (None, [])
    assert "failedBy" not in activation.to_json() and "logs" not in activation.to_json()

    activation.finish(failure(504, "too slow", 1.0, timed_out=True))
    activation.logs.append("a line")
    again = Activation.from_stored(StoredActivation.decode(activation.encode()))
    assert again.failed_by == FAILED_BY_TIMEOUT
    assert again.logs == ["a line"]
    again.finish(Outcome(200, [], b"{}", 0.1))
    assert "failedBy" not in again.to_json()  # a success has no one who failed it
