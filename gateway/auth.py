"""HTTP Basic auth, as the OpenFaaS gateway does it: /system/* always when basic_auth=true, the
invocation routes too when basic_auth_invocations=true.

Credentials are read once at start, from the files ``basic-auth-user`` and
``basic-auth-password`` under ``secret_mount_path`` (how Docker and Kubernetes secrets arrive),
else from the settings basic_auth_user / basic_auth_password (local use).
"""

import base64
import binascii
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.errors import error_response
from gateway.settings import GatewaySettings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHALLENGE = {"WWW-Authenticate": 'Basic realm="Restricted"'}
USER_FILE = "basic-auth-user"
PASSWORD_FILE = "basic-auth-password"


class AuthSetupError(Exception):
    """basic_auth is on but no usable credentials were found; the message says where to put them."""


@dataclass(frozen=True)
class Credentials:
    user: bytes
    password: bytes

    def accept(self, authorization: str | None) -> bool:
        """True for an ``Authorization: Basic ...`` header with these credentials."""
        if not authorization:
            return False
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, separator, password = decoded.partition(b":")
        # Both compared in full, in constant time, so the answer's timing tells nothing.
        user_ok = hmac.compare_digest(user, self.user)
        password_ok = hmac.compare_digest(password, self.password)
        return bool(separator) and user_ok and password_ok


def load_credentials(settings: GatewaySettings) -> Credentials:
    directory = Path(settings.secret_mount_path)
    user_file, password_file = directory / USER_FILE, directory / PASSWORD_FILE
    if user_file.exists() or password_file.exists():
        try:
            user = user_file.read_text(encoding="utf-8").strip()
            password = password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise AuthSetupError(
                f"basic_auth: cannot read {exc.filename}: {exc.strerror}; both {USER_FILE} and "
                f"{PASSWORD_FILE} are needed in {directory}"
            ) from exc
        source = str(directory)
    else:
        user, password = settings.basic_auth_user, settings.basic_auth_password
        source = "basic_auth_user/basic_auth_password"
    if not user or not password:
        raise AuthSetupError(
            f"basic_auth=true needs credentials: the files {USER_FILE} and {PASSWORD_FILE} in "
            f"{directory} (secret_mount_path), or basic_auth_user and basic_auth_password"
        )
    if ":" in user:
        raise AuthSetupError(f"basic_auth: the user name from {source} may not contain ':'")
    return Credentials(user.encode(), password.encode())


def require_auth(handle: Handler, credentials: Credentials) -> Handler:
    async def route(request: web.Request) -> web.StreamResponse:
        if not credentials.accept(request.headers.get("Authorization")):
            return error_response(401, "authentication required", None, dict(CHALLENGE))
        return await handle(request)

    return route
