"""schemathesis hooks for tests/system/test_openapi.py (SCHEMATHESIS_HOOKS names this file).

schemathesis deploys functions of its own (POST and PUT /system/functions) and then calls
them. A generated deployment names a generated URL, so those calls would go to whatever host
was generated (real ones on the internet among them) and come back 502. Every deployment it
sends names the stack's echo function instead (FAAS_TEST_FUNCTION_URL); everything else about
the body stays as generated, and a `url` that is not a string is left for the 400 it earns.
"""

import os
from typing import Any

import schemathesis


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    deploys = case.operation.path == "/system/functions" and case.method.upper() in ("POST", "PUT")
    if deploys and isinstance(case.body, dict) and isinstance(case.body.get("url"), str):
        case.body["url"] = os.environ["FAAS_TEST_FUNCTION_URL"]
