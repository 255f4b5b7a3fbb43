"""The async baseline: a minimal aiohttp handler that publishes the body to JetStream and
awaits the ack, on the same event loop the gateway uses. Scenario 4 compares against it.

    python -m bench.baseline --port 9702 --nats-url nats://127.0.0.1:4222
"""

import argparse
import uuid
from collections.abc import AsyncIterator

import nats
from aiohttp import web
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from faas_gateway.runtime.loops import new_event_loop

STREAM = "bench-baseline"
SUBJECT = "bench.baseline"
JETSTREAM = web.AppKey("jetstream", JetStreamContext)


async def publish(request: web.Request) -> web.Response:
    # The work the gateway cannot skip either: read the body, publish with a message id
    # (deduplication costs the server work too), wait for the ack.
    body = await request.read()
    call_id = str(uuid.uuid4())
    await request.app[JETSTREAM].publish(SUBJECT, body, headers={"Nats-Msg-Id": call_id}, timeout=5)
    return web.json_response({"callId": call_id}, status=202)


def build_app(nats_url: str) -> web.Application:
    async def connection(app: web.Application) -> AsyncIterator[None]:
        client = await nats.connect(nats_url)
        js = client.jetstream()
        config = StreamConfig(
            name=STREAM,
            subjects=[SUBJECT],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=120,
        )
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
        app[JETSTREAM] = js
        yield
        await client.close()

    app = web.Application()
    app.cleanup_ctx.append(connection)
    app.router.add_post("/publish", publish)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--nats-url", required=True)
    args = parser.parse_args()
    web.run_app(
        build_app(args.nats_url),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=new_event_loop("auto"),
    )


if __name__ == "__main__":
    main()
