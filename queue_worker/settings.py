from typing import Annotated

from pydantic import Field, field_validator

from faas_gateway.core.retry import MAX_ATTEMPTS, MAX_WAIT_S, parse_codes
from faas_gateway.runtime.settings import CommonSettings, Seconds, setting

# The same bounds as a function's com.openfaas.retry.* annotations (faas_gateway/retries.py).
RetryAttempts = Annotated[int, Field(ge=1, le=MAX_ATTEMPTS)]
RetryWait = Annotated[Seconds, Field(le=MAX_WAIT_S)]


class WorkerSettings(CommonSettings):
    worker_host: str = setting(
        "127.0.0.1", "worker_host", "Address of the worker's /healthz and /metrics listener."
    )
    worker_port: int = setting(8081, "worker_port", "Port of the worker's /healthz and /metrics.")
    max_inflight: int = setting(100, "max_inflight", "Calls one worker process runs at once.")
    ack_wait_s: Seconds = setting(
        30.0,
        "ack_wait",
        "Lease on a fetched message; the worker renews it while a call runs, so calls may "
        "last longer than this.",
    )
    read_timeout_s: Seconds = setting(
        60.0, "read_timeout", "Default longest wait for the next bytes of a function's response."
    )
    write_timeout_s: Seconds = setting(
        60.0, "write_timeout", "Default longest wait to connect to a function."
    )
    exec_timeout_s: Seconds = setting(
        60.0, "exec_timeout", "Default limit on a whole function call (then status 504)."
    )
    shutdown_grace_s: Seconds = setting(
        30.0,
        "shutdown_grace",
        "On SIGTERM/SIGINT, how long running calls may finish before they are returned to "
        "the queue.",
    )
    max_ack_pending: int = setting(
        20000,
        "max_ack_pending",
        "Consumer limit on fetched, unacknowledged messages across all workers.",
    )
    prefetch: int | None = setting(
        None,
        "prefetch",
        "Messages fetched ahead of free slots, so a freed slot starts its next call at once. "
        "Default: a quarter of max_inflight.",
    )
    max_fetch_batch: int = setting(100, "max_fetch_batch", "Most messages taken in one fetch.")
    fetch_wait_s: Seconds = setting(
        1.0, "fetch_wait", "How long one fetch waits on an empty queue before asking again."
    )
    running_record_delay_s: Seconds = setting(
        1.0,
        "running_record_delay",
        "A call's activation record says running once the call has run this long; shorter "
        "calls go from queued to their outcome in one write (0: at once).",
    )
    retry_http_codes: str = setting(
        "408,429,500,502,503,504",
        "retry_http_codes",
        "Function statuses that are retried (ranges like 500-504 allowed); connection errors "
        "and timeouts always are.",
    )
    max_retry_attempts: RetryAttempts = setting(
        10,
        "max_retry_attempts",
        "Function calls in all for one async call, the first included (1 to 1000).",
    )
    initial_retry_wait_s: RetryWait = setting(
        10.0,
        "initial_retry_wait",
        "Wait before the first retry; doubles up to max_retry_wait (at most 24h).",
    )
    max_retry_wait_s: RetryWait = setting(
        120.0,
        "max_retry_wait",
        "Longest wait between retries (also caps Retry-After; at most 24h).",
    )
    worker_queue: str = setting(
        "default",
        "worker_queue",
        "The queue this worker serves: functions with the annotation com.openfaas.queue of "
        "that name; 'default' serves all others.",
    )
    defer_wait_s: Seconds = setting(
        1.0,
        "defer_wait",
        "A call whose function is at its max_inflight annotation goes back to the queue for "
        "this long, holding no slot.",
    )

    @field_validator("retry_http_codes")
    @classmethod
    def _codes_are_valid(cls, codes: str) -> str:
        parse_codes(codes)  # its ValueError names the bad part
        return codes

    @property
    def consumer_name(self) -> str:
        return self.consumer_for(self.worker_queue)

    @property
    def queue_subjects(self) -> str:
        return f"{self.nats_subject_prefix}.{self.worker_queue}.>"
