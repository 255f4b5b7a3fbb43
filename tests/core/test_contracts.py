"""The pieces both processes share: durations and times, the functions file and the queued
message."""

from pathlib import Path

import pytest

from faas_gateway.core.call import SCHEMA_VERSION, MalformedMessageError, QueuedCall
from faas_gateway.core.functions import (
    FunctionsFileError,
    is_valid_function_name,
    load_functions_file,
)
from faas_gateway.core.timefmt import parse_duration_s, parse_rfc3339_ns, rfc3339_ms


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("60", 60.0),
        ("2.5", 2.5),
        (30, 30.0),
        (0.25, 0.25),
        ("65s", 65.0),
        ("1m5s", 65.0),
        ("1h", 3600.0),
        ("1h2m3s", 3723.0),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("250us", 0.00025),
        (" 10s ", 10.0),
    ],
)
def test_durations_accept_seconds_and_go_strings(text, seconds):
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "10x", "1m5", "-5", "5s10", "abc", True, None, "nan"])
def test_durations_reject_anything_else(text):
    with pytest.raises(ValueError):
        parse_duration_s(text)


def test_record_times_are_rfc3339_utc_with_milliseconds_and_read_back() -> None:
    unix_ns = 1_795_392_000_123_456_789
    text = rfc3339_ms(unix_ns)
    assert text == "2026-11-23T00:00:00.123Z"
    assert parse_rfc3339_ns(text) == 1_795_392_000_123_000_000
    assert rfc3339_ms(None) is None
    assert parse_rfc3339_ns("2026-11-23T01:00:00+01:00") == 1_795_392_000_000_000_000
    with pytest.raises(ValueError):
        parse_rfc3339_ns("2026-11-23T00:00:00")  # no zone


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("echo", True),
        ("a", True),
        ("fn.namespace", True),
        ("my_fn-2", True),
        ("9lives", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("-leading-dash", False),
        (".hidden", False),
        ("has space", False),
        ("slash/name", False),
        ("", False),
    ],
)
def test_function_names(name, valid):
    assert is_valid_function_name(name) is valid


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "functions.yml"
    path.write_text(text)
    return path


def test_functions_file_loads_urls_timeouts_and_annotations(tmp_path):
    registry = load_functions_file(
        write(
            tmp_path,
            """
functions:
  echo:
    url: http://127.0.0.1:9001/
  slow:
    url: https://slow.example:8443/base
    read_timeout: 1m
    write_timeout: 10
    exec_timeout: 1m30s
    annotations:
      com.openfaas.queue: slow-queue
      retries: 3
""",
        )
    )
    assert len(registry) == 2
    echo = registry.get("echo")
    assert echo is not None
    assert echo.url == "http://127.0.0.1:9001"
    assert echo.exec_timeout_s is None
    slow = registry.get("slow")
    assert slow is not None
    assert (slow.read_timeout_s, slow.write_timeout_s, slow.exec_timeout_s) == (60, 10, 90)
    assert slow.annotations == {"com.openfaas.queue": "slow-queue", "retries": "3"}
    assert str(slow.url_for("/a%2Fb", "x=1")) == "https://slow.example:8443/base/a%2Fb?x=1"
    assert registry.get("missing") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("functions:\n  echo:\n    url: ftp://x\n", ["'echo'", "url", "http"]),
        ("functions:\n  echo: {}\n", ["'echo'", "url", "Field required"]),
        (
            "functions:\n  echo:\n    url: http://x\n    image: foo\n",
            ["'echo'", "image", "unknown key"],
        ),
        (
            "functions:\n  echo:\n    url: http://x\n    exec_timeout: soon\n",
            ["'echo'", "exec_timeout"],
        ),
        ("functions:\n  -bad:\n    url: http://x\n", ["'-bad'", "name", "must match"]),
        ("functions:\n  echo: http://x\n", ["'echo'", "mapping"]),
        ("functons:\n  echo:\n    url: http://x\n", ["'functions:'"]),
        ("functions: [1, 2]\n", ["mapping"]),
        ("functions:\n  echo:\n    url: [unclosed\n", ["not valid YAML"]),
    ],
)
def test_malformed_functions_file_names_file_entry_and_problem(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(FunctionsFileError) as caught:
        load_functions_file(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    for fragment in expected:
        assert fragment in message


def test_missing_functions_file_is_a_clear_error(tmp_path):
    with pytest.raises(FunctionsFileError, match="cannot read"):
        load_functions_file(tmp_path / "absent.yml")


def test_empty_functions_file_is_an_empty_registry(tmp_path):
    assert len(load_functions_file(write(tmp_path, "functions:\n"))) == 0


def sample_call(**changes) -> QueuedCall:
    values = dict(
        call_id="c-1",
        function="echo",
        method="POST",
        path="/sub/a%2Fb",
        query="x=1&y=%20",
        headers=[("Content-Type", "text/plain"), ("X-Multi", "1"), ("X-Multi", "2")],
        body=b"line one\nline two\n\x00\xff binary",
        callback_url="http://127.0.0.1:9/cb",
        accepted_at_ns=1_700_000_000_000_000_000,
    )
    values.update(changes)
    return QueuedCall(**values)


def test_queued_call_round_trips_with_binary_body_and_repeated_headers():
    call = sample_call()
    decoded = QueuedCall.decode(call.encode())
    assert decoded == call
    assert decoded.schema_version == SCHEMA_VERSION


def test_queued_call_without_callback_or_body():
    call = sample_call(callback_url=None, body=b"")
    assert QueuedCall.decode(call.encode()) == call


def test_body_is_carried_raw_not_base64():
    body = bytes(range(256)) * 100
    encoded = sample_call(body=body).encode()
    assert encoded.endswith(body)
    assert len(encoded) < len(body) + 500


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"no newline at all",
        b"not json\nbody",
        b"[1,2]\nbody",
        b'{"v": 99, "callId": "x"}\nbody',
        b'{"v": 1, "callId": "x"}\nbody',
        b'{"v":1,"callId":5,"function":"f","method":"POST","path":"","query":"",'
        b'"headers":[],"callbackUrl":null,"acceptedAtNs":1}\n',
        b'{"v":1,"callId":"c","function":"f","method":"POST","path":"","query":"",'
        b'"headers":[["only-name"]],"callbackUrl":null,"acceptedAtNs":1}\n',
    ],
)
def test_malformed_messages_are_rejected(payload):
    with pytest.raises(MalformedMessageError):
        QueuedCall.decode(payload)
