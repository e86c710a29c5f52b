"""Serve the Nuclio function over plain HTTP, for development and small set-ups.

    python server.py [--host 127.0.0.1] [--port 8080]

POST / with CVAT's tracker JSON; GET /health answers 200 when the model is loaded and the state
store answers. `main.init_context` runs once and `main.handler` runs per request with nuclio_sdk
events, and the handler's output is turned into a response exactly as Nuclio's wrapper does.
Requests run one at a time on one worker thread, like a Nuclio trigger with numWorkers: 1.
"""

import argparse
import asyncio
import concurrent.futures
import json
import logging
import sys

import nuclio_sdk
import nuclio_sdk.logger
from aiohttp import web

import main


def make_context(level: int = logging.INFO) -> nuclio_sdk.Context:
    logger = nuclio_sdk.Logger(level, name="sam2-tracker")
    logger.set_handler("stderr", sys.stderr, nuclio_sdk.logger.HumanReadableFormatter())
    return nuclio_sdk.Context(logger=logger)


def make_event(*, body: bytes, content_type: str, method: str, path: str, headers: dict) -> nuclio_sdk.Event:
    # Nuclio's wrapper decodes the body only for exactly "application/json"; otherwise the
    # handler gets bytes (REFERENCE §3). Undecodable JSON is passed on as bytes for a clear 400.
    size = len(body)
    if content_type == "application/json" and body:
        try:
            body = json.loads(body)
        except ValueError:
            pass
    return nuclio_sdk.Event(
        body=body, content_type=content_type, method=method, path=path, headers=headers, size=size
    )


def build_app(context: nuclio_sdk.Context, *, max_body_bytes: int) -> web.Application:
    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="handler")

    def invoke(event: nuclio_sdk.Event) -> web.Response:
        output = main.handler(context, event)
        response = nuclio_sdk.Response.from_entrypoint_output(json.dumps, output)
        return web.Response(
            body=response["body"] if isinstance(response["body"], bytes) else str(response["body"]).encode(),
            status=response["status_code"],
            headers=response["headers"] or {},
            content_type=response["content_type"],
        )

    async def call(request: web.Request) -> web.Response:
        if (request.content_length or 0) > max_body_bytes:
            error = f"request body is {request.content_length} bytes; the limit is {max_body_bytes} (SAM2_MAX_BODY_BYTES)"
            return web.json_response({"error": error}, status=413)
        body = await request.read() if request.method == "POST" else b""
        event = make_event(
            body=body,
            content_type=request.headers.get("Content-Type", ""),
            method=request.method,
            path=request.path,
            headers=dict(request.headers),
        )
        return await asyncio.get_running_loop().run_in_executor(worker, invoke, event)

    app = web.Application(client_max_size=max_body_bytes)
    app.router.add_post("/", call)
    app.router.add_get("/", call)
    app.router.add_get("/health", call)
    app.on_shutdown.append(lambda _: worker.shutdown(wait=False))
    return app


def run(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    context = make_context()
    try:
        main.init_context(context)
    except Exception as e:  # start-up failures: say what to fix, without a traceback wall
        context.logger.error_with("could not start the tracker", error=f"{type(e).__name__}: {e}")
        sys.exit(1)
    app = build_app(context, max_body_bytes=context.user_data.settings.max_body_bytes)
    web.run_app(app, host=args.host, port=args.port, print=lambda msg: context.logger.info(msg))


if __name__ == "__main__":
    run()
