"""One log line shape for both processes: call id and function on every line about a call."""

import logging
import sys

CALL_FIELDS = ("callId", "function")


class CallContextFormatter(logging.Formatter):
    """Appends ``callId=... function=...`` when the record carries them (``extra=...``)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(
            f"{key}={getattr(record, key)}" for key in CALL_FIELDS if hasattr(record, key)
        )
        return f"{line} {context}" if context else line


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(CallContextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's per-request access log costs more than the proxying itself at high rates.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def call_context(call_id: str, function: str) -> dict[str, str]:
    return {"callId": call_id, "function": function}
