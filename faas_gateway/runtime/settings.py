"""Settings shared by both processes, and the helpers that turn settings into docs and flags.

Environment variable names follow OpenFaaS where it has one (``read_timeout``, ``ack_wait``,
...); the Python attribute carries the unit (``read_timeout_s``). Durations accept seconds or
Go duration strings.
"""

from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from faas_gateway.core.callback_policy import signing_keys
from faas_gateway.core.events import is_valid_subject, subject_spaces
from faas_gateway.core.timefmt import format_duration_s, parse_duration_s
from faas_gateway.nats import auth as nats_auth

Seconds = Annotated[float, BeforeValidator(parse_duration_s)]
# A size limit of a stream or bucket: JetStream's -1 (none) is not offered.
ByteLimit = Annotated[int, Field(gt=0)]

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


def _usable_signing_secrets(value: str) -> str:
    signing_keys(value)  # ValueError at start, not at the first callback
    return value


SigningSecrets = Annotated[str, AfterValidator(_usable_signing_secrets)]


def setting(default: Any, env: str, description: str) -> Any:
    """A settings field read from the environment variable ``env`` (case-insensitive)."""
    return Field(default, validation_alias=env, description=description)


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="ignore",
        validate_by_name=True,
        validate_by_alias=True,
        frozen=True,
        # Validation errors leave the values out: some are passwords and tokens.
        hide_input_in_errors=True,
    )

    nats_url: str = setting(
        "nats://127.0.0.1:4222", "nats_url", "NATS server URL(s), comma-separated for a cluster."
    )
    functions_file: Path = setting(
        Path("deploy/functions.yml"), "functions_file", "YAML file that registers the functions."
    )
    functions_bucket: str = setting(
        "faas-functions",
        "functions_bucket",
        "NATS key-value bucket of the functions deployed through /system/functions.",
    )
    functions_max_bytes: ByteLimit = setting(
        64 * MIB,
        "functions_max_bytes",
        "Most bytes of the functions bucket; when full, deploys get 503.",
    )
    function_namespace: str = setting(
        "openfaas-fn",
        "function_namespace",
        "The one namespace functions live in (GET /system/namespaces; name.namespace in URLs).",
    )
    nats_stream: str = setting("faas-async", "nats_stream", "JetStream stream holding async calls.")
    async_queue_max_bytes: ByteLimit = setting(
        GIB,
        "async_queue_max_bytes",
        "Most bytes the async stream holds; a call that does not fit gets 503 with "
        "Retry-After, and nothing queued is dropped to make room.",
    )
    async_retention_s: Seconds = setting(
        7 * 24 * 3600.0,
        "async_retention",
        "A call still in the queue this long after it was accepted leaves it without running "
        "(the stream's max_age); 0: kept until it runs.",
    )
    nats_subject_prefix: str = setting(
        "faas.async",
        "nats_subject_prefix",
        "Async calls are published to <prefix>.<queue>.<function>.",
    )
    nats_consumer: str = setting(
        "faas-queue-worker", "nats_consumer", "Durable pull consumer shared by all queue-workers."
    )
    nats_stream_replicas: int = setting(
        1,
        "nats_stream_replicas",
        "Replicas of every stream, bucket and object store when created, on a NATS cluster "
        "(1-5); 3 keep working when one server is lost.",
    )
    duplicate_window_s: Seconds = setting(
        120.0,
        "duplicate_window",
        "JetStream drops a call published again under the same X-Call-Id within this window "
        "(a re-post of a call whose first publish got no ack).",
    )
    activation_bucket: str = setting(
        "faas-activations", "activation_bucket", "NATS key-value bucket of activation records."
    )
    activation_index_stream: str = setting(
        "faas-activations-index",
        "activation_index_stream",
        "JetStream stream indexing activations in the order accepted, for listing.",
    )
    activation_retention_s: Seconds = setting(
        72 * 3600.0,
        "activation_retention",
        "How long activation records and their results are kept.",
    )
    activation_max_bytes: ByteLimit = setting(
        GIB,
        "activation_max_bytes",
        "Most bytes of the activation records bucket; when full, the oldest records go first.",
    )
    activation_results_max_bytes: ByteLimit = setting(
        2 * GIB,
        "activation_results_max_bytes",
        "Most bytes of the object store of large results; a result that does not fit is cut to "
        "what fits in its record (512 KiB) and the record says storageFull.",
    )
    activation_index_max_bytes: ByteLimit = setting(
        256 * MIB,
        "activation_index_max_bytes",
        "Most bytes of the activation index stream; when full, the oldest entries go first.",
    )
    activation_max_result_bytes: int = setting(
        1024 * 1024,
        "activation_max_result_bytes",
        "Most bytes of a function's response body kept with its record; the rest is cut off "
        "and the record says truncated (callbacks still get the whole body).",
    )
    max_held_response_bytes: int = setting(
        8 * 1024 * 1024,
        "max_held_response_bytes",
        "A function response larger than this, of an async call or a sync call that turned "
        "async, is never held whole in memory: it goes into the results object store as it "
        "arrives, and its callback is sent from there.",
    )
    record_activations: bool = setting(
        True,
        "record_activations",
        "Write activation records. Off only to measure what recording costs (make bench).",
    )
    nats_reconnect_wait_s: Seconds = setting(
        2.0, "nats_reconnect_wait", "Pause between attempts to reach NATS; attempts never stop."
    )
    nats_user: str = setting(
        "", "nats_user", "NATS user to sign in as, with nats_password or nats_password_file."
    )
    nats_password: SecretStr = setting(SecretStr(""), "nats_password", "Password of nats_user.")
    nats_password_file: str = setting(
        "",
        "nats_password_file",
        "File holding the password of nats_user (a Docker secret, say), instead of nats_password.",
    )
    nats_token: SecretStr = setting(
        SecretStr(""), "nats_token", "Token to sign in to NATS with (its authorization.token)."
    )
    nats_token_file: str = setting(
        "", "nats_token_file", "File holding the NATS token, instead of nats_token."
    )
    nats_nkey_seed_file: str = setting(
        "", "nats_nkey_seed_file", "File holding an NKey seed (SU...) to sign in to NATS with."
    )
    nats_creds_file: str = setting(
        "",
        "nats_creds_file",
        "NATS credentials file (.creds: user JWT and NKey seed), for a server in JWT mode.",
    )
    nats_tls_ca_file: str = setting(
        "",
        "nats_tls_ca_file",
        "CA certificates (PEM) to check the NATS server's certificate with. Any nats_tls_* "
        "setting makes the process refuse a server that does not require TLS; without one, "
        "TLS is used when the server asks for it, checked against the system's CAs.",
    )
    nats_tls_cert_file: str = setting(
        "", "nats_tls_cert_file", "Client certificate (PEM) for NATS servers that verify clients."
    )
    nats_tls_key_file: str = setting(
        "", "nats_tls_key_file", "Private key (PEM) of nats_tls_cert_file."
    )
    nats_inbox_prefix: str = setting(
        "_INBOX",
        "nats_inbox_prefix",
        "Start of this process's reply subjects. Give each NATS user its own (make run: "
        "_INBOX.gateway, _INBOX.worker) and allow it to subscribe there only, so that no "
        "process can read another's replies.",
    )
    upstream_keepalive_s: Seconds = setting(
        4.0,
        "upstream_keepalive",
        "Idle keep-alive connections to functions and callback receivers close after this; "
        "shorter than the 5 s of Node.js and uvicorn servers, so we close first.",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = setting(
        "auto",
        "event_loop",
        "auto: uvloop when installed (it is, on Linux and macOS), else asyncio.",
    )
    callback_max_attempts: int = setting(
        10, "callback_max_attempts", "Attempts to deliver a callback before giving up on it."
    )
    callback_timeout_s: Seconds = setting(
        10.0, "callback_timeout", "Limit on one callback delivery attempt."
    )
    callback_initial_wait_s: Seconds = setting(
        1.0, "callback_initial_wait", "Wait before the first callback retry; doubles each time."
    )
    callback_max_wait_s: Seconds = setting(
        60.0, "callback_max_wait", "Longest wait between callback attempts."
    )
    callback_signing_secret: SigningSecrets = setting(
        "",
        "callback_signing_secret",
        "Standard Webhooks secrets (whsec_<base64 of 24+ bytes>), separated by spaces or commas "
        "while one is rotated. When set, callbacks carry webhook-id (<call id>:<function>:"
        "<status>), webhook-timestamp and webhook-signature (v1,<HMAC> for each secret).",
    )
    callback_allowed_hosts: str = setting(
        "",
        "callback_allowed_hosts",
        "Hosts callbacks may go to: names, *.wildcards, CIDRs, comma-separated. Empty: any "
        "host but link-local and unspecified addresses (cloud metadata endpoints).",
    )
    dead_letter_stream: str = setting(
        "faas-dead-letters",
        "dead_letter_stream",
        "JetStream stream keeping the requests of calls that failed for good.",
    )
    dead_letter_retention_s: Seconds = setting(
        7 * 24 * 3600.0, "dead_letter_retention", "How long dead letters are kept."
    )
    dead_letter_max_bytes: ByteLimit = setting(
        GIB,
        "dead_letter_max_bytes",
        "Most bytes of the dead letter stream; when full, the oldest dead letters go first.",
    )
    cancellation_bucket: str = setting(
        "faas-cancellations",
        "cancellation_bucket",
        "NATS key-value bucket of cancelled call ids, watched by every worker.",
    )
    cancellation_max_bytes: ByteLimit = setting(
        64 * MIB,
        "cancellation_max_bytes",
        "Most bytes of the cancellation bucket; when full, a cancel gets 503 until older "
        "cancellations expire (none is forgotten early).",
    )
    triggers_bucket: str = setting(
        "faas-triggers",
        "triggers_bucket",
        "NATS key-value bucket of the OpenWhisk triggers (/api/v1/namespaces/_/triggers), "
        "watched by every gateway.",
    )
    rules_bucket: str = setting(
        "faas-rules",
        "rules_bucket",
        "NATS key-value bucket of the OpenWhisk rules, watched by every gateway.",
    )
    feeds_bucket: str = setting(
        "faas-feeds",
        "feeds_bucket",
        "NATS key-value bucket of the built-in feeds (alarms, NATS subjects), watched by every "
        "gateway.",
    )
    events_max_bytes: ByteLimit = setting(
        64 * MIB,
        "events_max_bytes",
        "Most bytes of each of the triggers, rules and feeds buckets; when one is full, "
        "creating or changing its entries gets 503.",
    )
    fire_stream: str = setting(
        "faas-fires",
        "fire_stream",
        "JetStream stream of accepted trigger fires and connector events (work-queue "
        "retention), which the gateways fan out to the async queue.",
    )
    fire_max_bytes: ByteLimit = setting(
        256 * MIB,
        "fire_max_bytes",
        "Most bytes the fire stream holds; a fire that does not fit gets 503 with Retry-After, "
        "and nothing accepted is dropped to make room.",
    )
    event_subjects: str = setting(
        "events.>",
        "event_subjects",
        "NATS subjects that nats/subject feeds and functions' topic annotations may listen on: "
        "subjects or wildcards, comma-separated. make run's gateway may subscribe there and its "
        "user events publish there.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = setting(
        "info", "log_level", "Log level."
    )
    log_format: Literal["text", "json"] = setting(
        "text",
        "log_format",
        "text: a line for people; json: one JSON object a line, for log collectors.",
    )

    @field_validator("event_subjects")
    @classmethod
    def _event_subjects_are_subjects(cls, value: str) -> str:
        for space in subject_spaces(value):
            if not is_valid_subject(space):
                raise ValueError(f"{space!r} is not a NATS subject or wildcard")
        return value

    @model_validator(mode="after")
    def _nats_credentials_are_consistent(self) -> Self:
        problems = nats_auth.setting_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def subject_for(self, queue: str, function: str) -> str:
        """Async calls of ``function`` go to <prefix>.<queue>.<function>."""
        return f"{self.nats_subject_prefix}.{queue}.{function}"

    def consumer_for(self, queue: str) -> str:
        """The durable consumer the workers of ``queue`` share."""
        if queue == "default":
            return self.nats_consumer
        return f"{self.nats_consumer}-{queue}"

    @property
    def subjects_wildcard(self) -> str:
        return f"{self.nats_subject_prefix}.>"


def env_name(name: str, info: FieldInfo) -> str:
    alias = info.validation_alias
    return alias if isinstance(alias, str) else name


def describe_default(info: FieldInfo) -> str:
    default = info.get_default(call_default_factory=True)
    if isinstance(default, SecretStr):
        default = default.get_secret_value()
    if default is None:
        return "(auto)"
    if (
        isinstance(default, float)
        and info.metadata
        and any(
            isinstance(item, BeforeValidator) and item.func is parse_duration_s
            for item in info.metadata
        )
    ):
        return format_duration_s(default)
    if isinstance(default, bool):
        return str(default).lower()
    if default == "":
        return "(empty)"
    return str(default)


def settings_table(settings_cls: type[BaseSettings]) -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every field, for --help and the
    configuration table of docs/operations.md."""
    rows = []
    for name, info in settings_cls.model_fields.items():
        rows.append((env_name(name, info), describe_default(info), info.description or ""))
    return rows
