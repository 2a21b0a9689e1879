"""The HTTP interface of ``tipcap serve``: a Starlette app over a :class:`~tipcap.app.service.Captioner`,
served by uvicorn, and the page in ``static/``.

Starlette, not Gradio: the page needs a few JSON routes and one static page, and Starlette gives them with
two small, well-kept dependencies (Starlette, uvicorn) and no front-end build, where Gradio brings a large
dependency tree, its own front end and network calls that a closed machine must switch off.

Routes:

- ``GET /`` the page; ``GET /static/…`` its script and style.
- ``GET /api/methods`` the methods served, the default one and the limits.
- ``POST /api/images?name=<file name>`` an image's bytes as the body (at most the upload limit) →
  ``{"image_id", "image", "width", "height"}``.
- ``POST /api/caption`` ``{"image_id", "method", "prompt": [words], "beams"}`` → the caption with and without
  the prompt words and CLIP's entity guesses (:meth:`Captioner.caption`).
- ``POST /api/jsonl`` ``{"results": [{"image", "caption", "prompt"}]}`` → those results as the JSONL file
  ``tipcap caption --out`` writes (a ``method`` per line is kept when several are shown), as a download.

Errors are ``{"error": message}`` with a 4xx status; the page shows the message. Model work runs in a
worker thread, so the server keeps answering while a caption is computed.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tipcap.app.service import Captioner, RequestError
from tipcap.errors import TipcapError
from tipcap.model import CaptionResult, caption_record

STATIC = Path(str(files("tipcap.app") / "static"))
MAX_JSON_BYTES = 1024 * 1024


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, read up to :data:`MAX_JSON_BYTES`."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise RequestError(f"request body over {MAX_JSON_BYTES // 1024} KB.", status=413)
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RequestError("the request body is not JSON.") from None
    if not isinstance(payload, dict):
        raise RequestError("the request body must be a JSON object.")
    return payload


def create_app(captioner: Captioner) -> Starlette:
    """The web app serving ``captioner`` and the page."""

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def methods(request: Request) -> Response:
        return JSONResponse(captioner.describe())

    async def images(request: Request) -> Response:
        name = request.query_params.get("name") or "image"
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > captioner.max_upload_bytes:
            raise RequestError(captioner.too_large(name, int(declared)), status=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > captioner.max_upload_bytes:
                raise RequestError(captioner.too_large(name, len(body)), status=413)
        return JSONResponse(await run_in_threadpool(captioner.add_image, name, bytes(body)))

    async def caption(request: Request) -> Response:
        payload = await _json_body(request)
        image_id, method = payload.get("image_id"), payload.get("method")
        if not isinstance(image_id, str) or not isinstance(method, str):
            raise RequestError("caption: give image_id and method.")
        result = await run_in_threadpool(
            captioner.caption, image_id, method, payload.get("prompt"), payload.get("beams", 3)
        )
        return JSONResponse(result)

    async def jsonl(request: Request) -> Response:
        rows = (await _json_body(request)).get("results")
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise RequestError('download: give {"results": [{"image", "caption", "prompt"}, …]}.')
        lines = []
        for row in rows:
            record = caption_record(
                CaptionResult(str(row.get("image")), str(row.get("caption")), list(row.get("prompt") or []))
            )
            if "method" in row:
                record["method"] = str(row["method"])
            lines.append(json.dumps(record) + "\n")
        return Response(
            "".join(lines),
            media_type="application/jsonl",
            headers={"Content-Disposition": 'attachment; filename="captions.jsonl"'},
        )

    async def request_error(request: Request, error: Exception) -> Response:
        status = error.status if isinstance(error, RequestError) else 400
        return JSONResponse({"error": str(error)}, status_code=status)

    routes = [
        Route("/", page),
        Route("/api/methods", methods),
        Route("/api/images", images, methods=["POST"]),
        Route("/api/caption", caption, methods=["POST"]),
        Route("/api/jsonl", jsonl, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={TipcapError: request_error})


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: a free port), or a one-line error."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, protocol)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise TipcapError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
            "pass another --port, or 0 for a free one."
        ) from None
    sock.listen(128)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(
    captioner: Captioner, host: str = "127.0.0.1", port: int = 8000, echo: Callable[[str], None] = print
) -> None:
    """Serve ``captioner`` until interrupted; ``echo`` receives the page's address once it listens."""
    sock = _bind(host, port)
    echo(f"serving {', '.join(captioner.models)} at {_url(sock)} (Ctrl-C stops)")
    uvicorn.Server(uvicorn.Config(create_app(captioner), log_level="warning")).run(sockets=[sock])


@contextmanager
def serving(captioner: Captioner, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``captioner`` from a background thread while the block runs; yields the page's address."""
    sock = _bind(host, port)
    server = uvicorn.Server(uvicorn.Config(create_app(captioner), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server stopped while starting")
        time.sleep(0.01)
    try:
        yield _url(sock)
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
