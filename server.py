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
    # Its lines (one per tracking request among them) go to this handler only: sam2 logs through
    # the root logger, which then gets a handler of its own that would print each line again.
    logging.getLogger("sam2-tracker").propagate = False
    return nuclio_sdk.Context(logger=logger)


def make_event(*, body: bytes, content_type: str, method: str, path: str, headers: dict) -> nuclio_sdk.Event:
    # Nuclio's wrapper (nuclio-sdk 0.6.3) decodes the body only when the content type is exactly
    # "application/json"; otherwise, "; charset=utf-8" included, the handler gets bytes.
    # Undecodable JSON is passed on as bytes, for the handler's clear 400.
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
    # Tracking requests run one at a time, like a Nuclio trigger with numWorkers: 1. Health checks
    # have a thread of their own, so they answer while a long request runs or others queue.
    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="handler")
    prober = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="health")

    def invoke(event: nuclio_sdk.Event) -> web.Response:
        output = main.handler(context, event)
        response = nuclio_sdk.Response.from_entrypoint_output(json.dumps, output)
        return web.Response(
            body=response["body"] if isinstance(response["body"], bytes) else str(response["body"]).encode(),
            status=response["status_code"],
            headers=response["headers"] or {},
            content_type=response["content_type"],
        )

    def too_large(size) -> web.Response:
        error = f"request body is {size} bytes; the limit is {max_body_bytes} (SAM2_MAX_BODY_BYTES)"
        return web.json_response({"error": error}, status=413)

    async def call(request: web.Request) -> web.Response:
        if (request.content_length or 0) > max_body_bytes:
            return too_large(request.content_length)
        try:
            body = await request.read() if request.method == "POST" else b""
        except web.HTTPRequestEntityTooLarge:  # a chunked body, whose size shows only as it arrives
            return too_large(f"over {max_body_bytes}")
        event = make_event(
            body=body,
            content_type=request.headers.get("Content-Type", ""),
            method=request.method,
            path=request.path,
            headers=dict(request.headers),
        )
        executor = prober if request.method == "GET" else worker
        return await asyncio.get_running_loop().run_in_executor(executor, invoke, event)

    @web.middleware
    async def json_errors(request: web.Request, handler) -> web.StreamResponse:
        # aiohttp's own errors (unknown path, wrong method, ...) in the function's JSON form too.
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return web.json_response({"error": e.reason}, status=e.status, headers={
                k: v for k, v in e.headers.items() if k.lower() == "allow"
            })

    async def stop_threads(_app: web.Application) -> None:
        worker.shutdown(wait=False)
        prober.shutdown(wait=False)

    app = web.Application(client_max_size=max_body_bytes, middlewares=[json_errors])
    app.router.add_post("/", call)
    app.router.add_get("/", call)
    app.router.add_get("/health", call)
    app.on_shutdown.append(stop_threads)
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
