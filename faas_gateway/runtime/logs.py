"""One log line shape for both processes: call id and function on every line about a call.

``log_format=text`` (the default) is for people reading a terminal; ``log_format=json`` is for
log collectors: one JSON object a line, the call's fields as fields. One handler on the root
logger serves our loggers and the libraries' (aiohttp, nats-py, asyncio) alike.
"""

import logging
import sys
import threading
from types import TracebackType
from typing import Any

from pythonjsonlogger.orjson import OrjsonFormatter

from faas_gateway.core.timefmt import rfc3339_ms
from faas_gateway.runtime.settings import CommonSettings

CALL_FIELDS = ("callId", "function")


class CallContextFormatter(logging.Formatter):
    """Appends ``callId=... function=...`` when the record carries them (``extra=...``)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Here rather than in format(): the fields end the first line, before any traceback.
        line = super().formatMessage(record)
        context = " ".join(
            f"{key}={getattr(record, key)}" for key in CALL_FIELDS if hasattr(record, key)
        )
        return f"{line} {context}" if context else line


class JsonLineFormatter(OrjsonFormatter):
    """One JSON object a line: time, level, logger, message, then every ``extra`` field
    (callId and function among them) and the traceback, if any, as ``exception``."""

    def __init__(self) -> None:
        super().__init__(
            ["asctime", "levelname", "name", "message"],
            rename_fields={
                "asctime": "time",
                "levelname": "level",
                "name": "logger",
                "exc_info": "exception",
                "stack_info": "stack",
            },
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """RFC 3339 in UTC with milliseconds: ``2025-01-31T12:00:00.123Z``."""
        return rfc3339_ms(int(record.created * 1e9)) or ""

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        # A traceback goes last, after the short fields a reader scans for.
        for key in ("exception", "stack"):
            if key in log_data:
                log_data[key] = log_data.pop(key)
        return log_data


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def new_formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonLineFormatter()
    return CallContextFormatter(TEXT_FORMAT)


def configure_logging(settings: CommonSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(new_formatter(settings.log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # aiohttp's per-request access log costs more than the proxying itself at high rates.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if settings.log_format == "json":
        # Python writes these to stderr itself, over several lines; a collector reading one
        # JSON object a line would split them into fragments.
        logging.captureWarnings(True)
        sys.excepthook = log_uncaught
        threading.excepthook = log_uncaught_in_thread


def log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    logging.getLogger("faas").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # what the default hook does too
    logging.getLogger("faas").critical(
        "uncaught exception in thread %s",
        args.thread.name if args.thread is not None else "?",
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )


def call_context(call_id: str, function: str) -> dict[str, str]:
    return {"callId": call_id, "function": function}
