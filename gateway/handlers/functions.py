"""The OpenFaaS management API: /system/functions, /system/function/{name}, /system/info and
/system/namespaces, with OpenFaaS's field names.

Deploy (POST) and update (PUT) take a FunctionDeployment plus ``url``; both answer 202 with the
FunctionStatus. As with faas-cli, update of an unknown function is 404 and deploy of a known
one 409. Functions of the functions file are listed but read-only here (409).
"""

import functools
import logging
import platform
import subprocess
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from faas_gateway import __version__
from faas_gateway.core.functions import FunctionSpec, Registry, is_valid_function_name
from faas_gateway.core.timefmt import now_rfc3339
from faas_gateway.core.validation import one_line
from faas_gateway.nats.function_store import (
    FunctionDeployment,
    FunctionStore,
    FunctionWatch,
)
from gateway.errors import (
    ClientGoneError,
    ConflictError,
    FunctionNotFoundError,
    InvalidRequestError,
    NotFoundError,
    NotOfferedError,
    PayloadTooLargeError,
)
from gateway.loops import gateway_url_problem
from gateway.metrics import GatewayMetrics
from gateway.queues import ServedQueues
from gateway.request_bodies import read_body

log = logging.getLogger("faas.gateway")

MAX_DEPLOYMENT_BYTES = 64 * 1024
URL_ANNOTATION = "com.openfaas.url"
PROVIDER = "faas-gateway"
ORCHESTRATION = "nats"


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    function_name: str
    namespace: str = ""


class Functions:
    def __init__(
        self,
        registry: Registry,
        store: FunctionStore,
        watch: FunctionWatch,
        metrics: GatewayMetrics,
        queues: ServedQueues,
        *,
        namespace: str,
        url_template: str,
        functions_file: Path,
        body_timeout_s: float,
        gateway_host: str,
        gateway_port: int,
    ) -> None:
        self._registry = registry
        self._store = store
        self._watch = watch
        self._metrics = metrics
        self._queues = queues
        self._namespace = namespace
        self._url_template = url_template
        self._functions_file = functions_file
        self._body_timeout_s = body_timeout_s
        self._gateway_host = gateway_host
        self._gateway_port = gateway_port
        # File functions exist from when this process read the file.
        self._file_loaded_at = now_rfc3339()

    # reads

    async def list_functions(self, request: web.Request) -> web.Response:
        self._check_namespace(request.query.get("namespace"))
        counts = self._metrics.invocation_counts()
        statuses = [
            self._status(function, counts)
            for function in sorted(self._registry, key=lambda f: f.name)
        ]
        return _json(200, statuses)

    async def get_function(self, request: web.Request) -> web.Response:
        self._check_namespace(request.query.get("namespace"))
        name = request.match_info["name"]
        function = self._registry.get(name)
        if function is None:
            if not is_valid_function_name(name):
                raise InvalidRequestError(f"invalid function name {name!r}")
            raise FunctionNotFoundError(f"function {name!r} not found")
        return _json(200, self._status(function, self._metrics.invocation_counts()))

    async def namespaces(self, request: web.Request) -> web.Response:
        return _json(200, [self._namespace])

    async def info(self, request: web.Request) -> web.Response:
        version = {"release": __version__, "sha": build_sha(), "commit_message": ""}
        return _json(
            200,
            {
                "provider": {
                    "provider": PROVIDER,
                    "orchestration": ORCHESTRATION,
                    "version": version,
                },
                "version": version,
                "arch": platform.machine(),
            },
        )

    # changes

    async def deploy(self, request: web.Request) -> web.Response:
        return await self._write(request, create=True)

    async def update(self, request: web.Request) -> web.Response:
        return await self._write(request, create=False)

    async def namespace(self, request: web.Request) -> web.Response:
        """GET /system/namespace/{namespace}: the one namespace (faas-cli namespace get)."""
        name = request.match_info["namespace"]
        if name != self._namespace:
            raise NotFoundError(
                f"namespace {name!r} not found; the one namespace is {self._namespace!r}"
            )
        return _json(200, {"name": name, "annotations": {}, "labels": {}})

    async def logs(self, request: web.Request) -> web.Response:
        """GET /system/logs (faas-cli logs): functions here are HTTP services run elsewhere."""
        raise NotOfferedError(
            "this gateway runs no containers and holds no function logs: read them where the "
            "function runs (e.g. docker compose logs <service>); a call's outcome is in its "
            "activation record, GET /system/activations/<call id>"
        )

    async def secrets(self, request: web.Request) -> web.Response:
        """/system/secrets (faas-cli secret): nothing here would mount a secret."""
        raise NotOfferedError(
            "this gateway runs no containers and has no secrets to mount: give secrets to the "
            "function where it runs (e.g. docker compose secrets)"
        )

    async def scale(self, request: web.Request) -> web.Response:
        """POST /system/scale-function/{name} (faas-cli scale): there are no replicas."""
        raise NotOfferedError(
            "this gateway starts no replicas: scale the function where it runs; to limit "
            "concurrent calls, set the annotation max_inflight and redeploy"
        )

    async def delete(self, request: web.Request) -> web.Response:
        document = await _read_json(request, self._body_timeout_s)
        try:
            target = DeleteRequest.model_validate(document)
        except ValidationError as exc:
            raise InvalidRequestError(f"invalid delete request: {describe(exc)}") from exc
        self._check_namespace(target.namespace or None)
        name = target.function_name
        if not is_valid_function_name(name):
            raise InvalidRequestError(f"invalid function name {name!r}")
        await self.remove(name)
        return web.Response(status=200)

    # What the OpenWhisk API's actions share with this API: one deploy path.

    async def check(self, deployment: FunctionDeployment) -> None:
        """InvalidRequestError for a deployment that cannot be served: another namespace, an
        unusable spec, or a URL that is the gateway itself."""
        self._check_namespace(deployment.namespace or None)
        try:
            deployment.to_spec()
        except ValidationError as exc:
            raise InvalidRequestError(f"invalid function deployment: {describe(exc)}") from exc
        problem = await gateway_url_problem(deployment.url, self._gateway_host, self._gateway_port)
        if problem is not None:
            raise InvalidRequestError(f"invalid function deployment: url: {problem}")

    async def save(self, deployment: FunctionDeployment, *, create: bool) -> str | None:
        """Deploy (``create``) or update a checked deployment: a conditional write to the
        bucket, applied here at once. FunctionExistsError or FunctionNotDeployedError when
        the function is, or is not, there already. Returns a warning when no worker serves
        the function's queue."""
        name = deployment.service
        self._refuse_file_function(name)
        change = self._store.create if create else self._store.update
        revision, stored = await change(deployment)
        # Applied here at once, so this gateway's next request sees the change; the others
        # get it from their watch.
        self._watch.apply(name, revision, stored)
        log.info("function %s deployed (revision %d)", name, revision)
        queue = deployment.to_spec().queue
        if await self._queues.is_served(queue) is False:
            warning = self._queues.warning(queue)
            log.warning("function %s: %s", name, warning)
            return warning
        return None

    async def remove(self, name: str) -> None:
        """Delete a function deployed through the API (FunctionNotDeployedError if none)."""
        self._refuse_file_function(name)
        revision = await self._store.delete(name)
        self._watch.apply(name, revision, None)
        log.info("function %s deleted", name)

    def deployment_of(self, function: FunctionSpec) -> tuple[FunctionDeployment, str, str]:
        """A registered function as a deployment (not validated: file names may hold dots,
        which API names may not), when it was deployed, and its source: "api" or "file"."""
        stored = (
            None
            if self._registry.in_file(function.name)
            else self._watch.deployed.get(function.name)
        )
        if stored is not None:
            return stored.deployment, stored.created_at, "api"
        deployment = FunctionDeployment.model_construct(
            service=function.name, url=function.url, annotations=dict(function.annotations)
        )
        return deployment, self._file_loaded_at, "file"

    # helpers

    async def _write(self, request: web.Request, *, create: bool) -> web.Response:
        document = await _read_json(request, self._body_timeout_s)
        if not create:
            # faas-cli updates first and deploys on a 404: an unknown function is a 404
            # whatever its body is like (it may lack what only a deploy would fill in).
            self._refuse_unknown(document)
        deployment = await self._deployment(document)
        warning = await self.save(deployment, create=create)
        name = deployment.service
        function = self._registry.get(name)
        assert function is not None  # just applied, and not shadowed by the file
        # OpenFaaS's API document: 202 for a deploy, 200 for an update.
        status = 202 if create else 200
        response = _json(status, self._status(function, self._metrics.invocation_counts()))
        response.headers["Location"] = f"/system/function/{name}"
        if warning is not None:
            # A header, as Kubernetes' API warns (RFC 7234's Warning with code 299), so the
            # FunctionStatus body stays as OpenFaaS clients know it.
            response.headers["Warning"] = f'299 - "{warning}"'
        return response

    def _refuse_unknown(self, document: Any) -> None:
        service = document.get("service") if isinstance(document, dict) else None
        if (
            isinstance(service, str)
            and is_valid_function_name(service)
            and self._registry.get(service) is None
        ):
            raise FunctionNotFoundError(f"function {service!r} not found")

    async def _deployment(self, document: Any) -> FunctionDeployment:
        if isinstance(document, dict) and not document.get("url"):
            document = {**document, "url": self._url_of(document)}
        try:
            deployment = FunctionDeployment.model_validate(document)
        except ValidationError as exc:
            raise InvalidRequestError(f"invalid function deployment: {describe(exc)}") from exc
        await self.check(deployment)
        return deployment

    def _url_of(self, document: dict[str, Any]) -> str:
        """Where a deployment without ``url`` is: its annotation com.openfaas.url (faas-cli
        passes annotations through; its stack.yml drops a ``url:`` key), else
        function_url_template; neither is a 400 that says how to give it."""
        annotations = document.get("annotations")
        if isinstance(annotations, dict) and isinstance(annotations.get(URL_ANNOTATION), str):
            return str(annotations[URL_ANNOTATION])
        service = document.get("service")
        if self._url_template and isinstance(service, str):
            return self._url_template.format(name=service, namespace=self._namespace)
        raise InvalidRequestError(
            "the deployment has no url: this gateway calls functions over HTTP and runs no "
            f"images. Give the function's URL as the annotation {URL_ANNOTATION} (in faas-cli's "
            f"stack.yml: annotations: {{{URL_ANNOTATION}: http://host:port}}), as 'url' in the "
            "body, or set function_url_template (e.g. http://{name}:8080) on the gateway"
        )

    def _refuse_file_function(self, name: str) -> None:
        if self._registry.in_file(name):
            raise ConflictError(
                f"function {name!r} is defined in the functions file "
                f"({self._functions_file}); change it there"
            )

    def _check_namespace(self, namespace: str | None) -> None:
        if namespace is not None and namespace != self._namespace:
            raise InvalidRequestError(
                f"namespace {namespace!r} does not exist; the one namespace is {self._namespace!r}"
            )

    def _status(self, function: FunctionSpec, counts: dict[str, float]) -> dict[str, Any]:
        deployed, created_at, source = self.deployment_of(function)
        deployment: dict[str, Any] = deployed.model_dump(by_alias=True)
        del deployment["service"]
        # faas-cli list -v and describe show the image: here, where the function is.
        deployment["image"] = deployment.get("image") or function.url
        for resources in ("limits", "requests"):
            if deployment.get(resources):  # as faas-provider: unset amounts left out
                deployment[resources] = {
                    k: v for k, v in deployment[resources].items() if v is not None
                }
        deployment["namespace"] = self._namespace
        return {
            "name": function.name,
            **deployment,
            "invocationCount": counts.get(function.name, 0.0),
            # One service behind one URL: the gateway does not run or scale it.
            "replicas": 1,
            "availableReplicas": 1,
            "createdAt": created_at,
            "source": source,
        }


async def _read_json(request: web.Request, timeout_s: float) -> Any:
    too_large = PayloadTooLargeError(f"the body is larger than {MAX_DEPLOYMENT_BYTES} bytes")
    if request.content_length is not None and request.content_length > MAX_DEPLOYMENT_BYTES:
        raise too_large
    try:
        body = await read_body(request, timeout_s, MAX_DEPLOYMENT_BYTES, too_large)
    except ClientGoneError as exc:
        log.debug("%s", exc.message)  # nobody to answer: no more than a debug line
        raise
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"the body is not valid JSON: {exc}") from exc


def describe(error: ValidationError) -> str:
    return one_line(error, whole="body")


def _json(status: int, document: Any) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(document, option=orjson.OPT_APPEND_NEWLINE),
        content_type="application/json",
    )


@functools.cache
def build_sha() -> str:
    """The git commit this code was installed from, when it runs from a checkout."""
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return completed.stdout.strip() if completed.returncode == 0 else "unknown"
