"""schemathesis hooks for tests/system/test_openapi.py (SCHEMATHESIS_HOOKS names this file).

schemathesis deploys functions of its own (POST and PUT /system/functions) and then calls
them. A generated deployment names a generated URL, so those calls would go to whatever host
was generated (real ones on the internet among them) and come back 502. Every deployment it
sends names the stack's echo function instead (FAAS_TEST_FUNCTION_URL), and so does every
OpenWhisk action it creates (its "url" annotation, without a generated time limit);
everything else about the body stays as generated, and a URL that is not a string is left for
the 400 it earns.
"""

import os
from typing import Any

import schemathesis


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    deploys = case.operation.path == "/system/functions" and case.method.upper() in ("POST", "PUT")
    if deploys and isinstance(case.body, dict) and isinstance(case.body.get("url"), str):
        case.body["url"] = os.environ["FAAS_TEST_FUNCTION_URL"]
    # OpenWhisk's actions name their URL in the annotation "url"; a generated limits.timeout
    # (1 ms, say) would make every later call of the action's function a 504.
    puts_action = "/actions/" in case.operation.path and case.method.upper() == "PUT"
    if not puts_action or not isinstance(case.body, dict):
        return
    case.body.pop("limits", None)
    for annotation in case.body.get("annotations") or ():
        is_url = isinstance(annotation, dict) and annotation.get("key") == "url"
        if is_url and isinstance(annotation.get("value"), str):
            annotation["value"] = os.environ["FAAS_TEST_FUNCTION_URL"]
