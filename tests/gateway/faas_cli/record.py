"""Record what a real faas-cli sends to this gateway, for tests/gateway/test_faas_cli.py.

faas-cli is a Go binary that the package registries this project installs from do not carry,
so the suite replays its requests instead of running it. This script makes the recording: it
puts a recording proxy in front of a running gateway (``make run``), runs faas-cli commands
through it, and writes every request with the status faas-cli got and its exit code.

    .venv/bin/python tests/gateway/faas_cli/record.py --faas-cli /path/to/faas-cli \\
        --gateway http://127.0.0.1:8080 --password-file .data/secrets/basic-auth-password \\
        --function-url http://127.0.0.1:9001

docs/development.md says how to build faas-cli from its source. The password is not written:
Authorization headers are kept as ``Basic <credentials>``, the test fills in its own.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

HERE = Path(__file__).parent
FUNCTION_URL = "http://127.0.0.1:9001"  # what the recording says; the test uses its own
CREDENTIALS = "<credentials>"
STACK = """\
version: 1.0
provider:
  name: openfaas
functions:
  hello:
    lang: dockerfile
    image: example/hello:0.1
    environment:
      GREETING: hi
    labels:
      team: web
    annotations:
      com.openfaas.url: {url}
      exec_timeout: 30s
"""
# (argv, stdin): the commands a user runs, in order; {url} is the function's address.
COMMANDS: list[tuple[list[str], str]] = [
    (["login", "-u", "admin", "--password-stdin"], "<password>"),
    (["version", "--warn-update=false"], ""),
    (["deploy", "-f", "stack.yml"], ""),
    (["deploy", "-f", "stack.yml"], ""),  # the second one updates
    (["list", "-v"], ""),
    (["describe", "hello"], ""),
    (["ready", "hello", "--attempts", "3"], ""),
    (["diff", "-f", "stack.yml"], ""),
    (["invoke", "hello"], "world"),
    (["invoke", "hello", "--async"], "later"),
    (["namespace", "list"], ""),
    (["namespace", "get", "openfaas-fn"], ""),
    (["logs", "hello", "--tail=false"], ""),
    (["secret", "list"], ""),
    (["remove", "-f", "stack.yml"], ""),
    (["deploy", "--image", "example/plain:1", "--name", "plain", "--annotation",
      "com.openfaas.url={url}", "--env", "A=1", "--label", "x=y"], ""),
    (["remove", "plain"], ""),
    (["remove", "plain"], ""),  # gone already
    (["deploy", "--image", "example/nourl:1", "--name", "nourl"], ""),
    (["ready", "--attempts", "3"], ""),
]  # fmt: skip


async def proxy(upstream: str, port: int, seen: list[dict[str, Any]]) -> web.AppRunner:
    session = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with session.request(
            request.method, upstream + request.path_qs, data=body, headers=headers
        ) as answer:
            answer_body = await answer.read()
            status = answer.status
            answer_headers = {
                k: v
                for k, v in answer.headers.items()
                if k.lower() not in ("transfer-encoding", "content-length", "date", "server")
            }
        kept = {
            k: (f"Basic {CREDENTIALS}" if k == "Authorization" and v.startswith("Basic") else v)
            for k, v in request.headers.items()
            if k not in ("Host", "Content-Length")
        }
        seen.append(
            {
                "method": request.method,
                "path_qs": request.path_qs,
                "headers": kept,
                "body": body.decode(),
                "status": status,
            }
        )
        return web.Response(status=status, body=answer_body, headers=answer_headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    app.on_cleanup.append(lambda _: session.close())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def record(faas_cli: str, gateway: str, password: str, function_url: str) -> Any:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen: list[dict[str, Any]] = []
    runner = await proxy(gateway.rstrip("/"), port, seen)
    version = (
        await asyncio.to_thread(
            subprocess.run,
            [faas_cli, "version", "--short-version"],
            capture_output=True,
            text=True,
            check=True,
        )
    ).stdout.strip()
    commands = []
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as work:
        (Path(work) / "stack.yml").write_text(STACK.format(url=function_url))
        env = {**os.environ, "HOME": home, "OPENFAAS_URL": f"http://127.0.0.1:{port}"}
        for argv, stdin in COMMANDS:
            argv = [arg.format(url=function_url) for arg in argv]
            before = len(seen)
            done = await asyncio.to_thread(
                subprocess.run,
                [faas_cli, *argv],
                input=password if stdin == "<password>" else stdin,
                capture_output=True,
                text=True,
                cwd=work if "-f" in argv else home,
                env=env,
            )
            requests = seen[before:]
            for request in requests:
                request["body"] = request["body"].replace(function_url, FUNCTION_URL)
            commands.append({"argv": argv, "exit": done.returncode, "requests": requests})
    await runner.cleanup()
    for command in commands:
        command["argv"] = [arg.replace(function_url, FUNCTION_URL) for arg in command["argv"]]
    return {"client": f"faas-cli {version}", "functionUrl": FUNCTION_URL, "commands": commands}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faas-cli", required=True)
    parser.add_argument("--gateway", default="http://127.0.0.1:8080")
    secrets = Path(".data/secrets")
    parser.add_argument("--password-file", type=Path, default=secrets / "basic-auth-password")
    parser.add_argument("--function-url", default=FUNCTION_URL, help="a function that echoes")
    options = parser.parse_args()
    password = options.password_file.read_text().strip()
    recording = asyncio.run(
        record(options.faas_cli, options.gateway, password, options.function_url)
    )
    out = HERE / f"{recording['client'].replace(' ', '-')}.json"
    out.write_text(json.dumps(recording, indent=1) + "\n")
    print(f"{sum(len(c['requests']) for c in recording['commands'])} requests in {out}")


if __name__ == "__main__":
    main()
