"""A tiny OTLP/HTTP sink for the bench: POST /v1/traces answers 200, counts requests and bytes.

It stands in for a collector that keeps up, so W1T measures what tracing costs the relay and
the agent (spans, context, the background export), not a collector's speed.
"""

from __future__ import annotations

import argparse

from aiohttp import web

COUNTS = web.AppKey("counts", dict)


async def traces(request: web.Request) -> web.Response:
    body = await request.read()
    counts = request.app[COUNTS]
    counts["posts"] += 1
    counts["bytes"] += len(body)
    # An empty ExportTraceServiceResponse is zero bytes of protobuf.
    return web.Response(body=b"", content_type="application/x-protobuf")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[COUNTS])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application(client_max_size=64 << 20)
    app[COUNTS] = {"posts": 0, "bytes": 0}
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
