"""The HTTP interface of ``tipcap serve``: a Starlette app over a :class:`~tipcap.app.service.CaptionService`,
served by uvicorn, and the page in ``static/``.

Starlette, not Gradio: the page needs a few JSON routes and one static page, and Starlette gives them with
two small, well-kept dependencies (Starlette, uvicorn) and no front-end build, where Gradio brings a large
dependency tree, its own front end and network calls that a closed machine must switch off.

Routes:

- ``GET /`` the page; ``GET /static/…`` its script and style.
- ``GET /api/methods`` the methods served (each with its prompt mode and the most prompt words it takes),
  the default one and the limits.
- ``POST /api/images?name=<file name>`` an image's bytes as the body (at most the upload limit; PNG, JPEG,
  GIF, BMP, TIFF or WebP, at most 20 times as long as wide) → ``{"image_id", "image", "width", "height"}``.
- ``POST /api/caption`` ``{"image_id", "method", "prompt": [words], "beams"}`` → the caption with and without
  the prompt words and CLIP's entity guesses (:meth:`CaptionService.caption`).
- ``POST /api/jsonl`` ``{"results": [{"image", "caption", "prompt"}]}`` (text, text, a list of words; an
  optional ``method``, kept when several are shown) → those results as the JSONL file
  ``tipcap caption --out`` writes, as a download.

Errors are ``{"error": message}`` with a 4xx status; the page shows the message. Model work runs in a
worker thread, so the server keeps answering while a caption is computed.

Other sites' pages cannot drive the server from a visitor's browser:

- A request whose ``Host`` does not name the server (:class:`Listening`) is answered 421: a page of
  another site that makes its own name resolve to this machine (DNS rebinding) sends that name.
- A request whose ``Origin`` is not the server's own is answered 403: browsers name the page that sends
  a request across sites.
- The JSON routes take ``Content-Type: application/json`` only, uploads ``image/png``, ``image/jpeg``,
  ``image/gif``, ``image/bmp``, ``image/tiff``, ``image/webp`` or ``application/octet-stream`` only
  (the page sends octet-stream: the server decodes those formats alone, whatever the type says), else 415:
  a page of another site may send form and ``text/plain`` bodies without asking first, not these.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from tipcap.app.service import CaptionService, RequestError
from tipcap.errors import TipcapError
from tipcap.io import lone_surrogate
from tipcap.pipeline import CaptionResult, caption_record

logger = logging.getLogger(__name__)

STATIC = Path(str(files("tipcap.app") / "static"))
MAX_JSON_BYTES = 1024 * 1024
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/bmp", "image/tiff", "image/webp")
"""The content types of an upload, besides ``application/octet-stream``: the formats decoded."""
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_HOST = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\s:/@\[\]]+))(?::(?P<port>[0-9]{1,5}))?")


def _host_and_port(value: str) -> tuple[str, int | None] | None:
    """``name:port`` (or ``[ipv6]:port``; the port may be left out) as the lower-cased name and the port;
    ``None`` when ``value`` is not of that form."""
    match = _HOST.fullmatch(value)
    if match is None:
        return None
    port = match.group("port")
    return (match.group("ipv6") or match.group("name")).lower(), int(port) if port else None


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Listening:
    """Where the server listens: ``host`` as given (``--host``), the ``address`` and ``port`` bound.

    A request's ``Host`` names the server when its port is the one bound (or left out, on port 80) and its
    name is one the server is reached under: ``localhost``, ``127.0.0.1`` or ``[::1]`` on a loopback
    address; on every address (``0.0.0.0``, ``::``) those, any IP address and this machine's name;
    otherwise the host as given and the address bound. A name of another site is refused.
    """

    host: str
    address: str
    port: int

    @classmethod
    def of(cls, host: str, sock: socket.socket) -> Listening:
        """The listening socket ``sock``, bound for ``--host host``."""
        address, port = sock.getsockname()[:2]
        return cls(host, address, port)

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the server."""
        return ipaddress.ip_address(self.address).is_loopback

    @property
    def everywhere(self) -> bool:
        """Whether the server listens on every address of the machine."""
        return ipaddress.ip_address(self.address).is_unspecified

    @property
    def url(self) -> str:
        """The address bound, as the page's address (``http://0.0.0.0:8000/`` on every address)."""
        return self._url(self.address)

    @property
    def local_url(self) -> str:
        """The page's address on this machine: :attr:`url`, or a loopback one when on every address."""
        if not self.everywhere:
            return self.url
        return self._url("::1" if ipaddress.ip_address(self.address).version == 6 else "127.0.0.1")

    def _url(self, address: str) -> str:
        return f"http://[{address}]:{self.port}/" if ":" in address else f"http://{address}:{self.port}/"

    def named_by(self, host: str) -> bool:
        """Whether a ``Host`` header value names this server."""
        parsed = _host_and_port(host)
        if parsed is None:
            return False
        name, port = parsed
        if port != self.port and not (port is None and self.port == 80):
            return False
        if self.loopback:
            return name in LOOPBACK_NAMES or name == self.address
        if self.everywhere:
            return name in LOOPBACK_NAMES or _is_address(name) or name == socket.gethostname().lower()
        return name in (self.host.lower(), self.address)


class _SameOrigin:
    """Refuses a request whose ``Host`` does not name the server (421) or whose ``Origin``, when sent, is
    not the server's own (403), before any route reads it."""

    def __init__(self, app: ASGIApp, listening: Listening) -> None:
        self.app = app
        self.listening = listening

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host, origin = headers.get("host", ""), headers.get("origin")
            refusal = None
            if not self.listening.named_by(host):
                refusal = JSONResponse(
                    {"error": f"Host {host!r} does not name this server; open {self.listening.url}."},
                    status_code=421,
                )
            elif origin is not None and origin.lower() != f"http://{host.lower()}":
                refusal = JSONResponse(
                    {"error": f"Origin {origin!r}: this server answers its own page only."}, status_code=403
                )
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _media_type(request: Request) -> str:
    """The request's ``Content-Type`` without its parameters, lower-cased; empty when none is sent."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


JsonPath = tuple[Any, str | int] | None
"""Where a value lies in a JSON document: ``(parent's path, key or index)``; ``None`` for the document."""


def _where(path: JsonPath) -> str:
    """A value's place for a message: ``prompt[1]``, ``results[0].image`` (at most 200 characters)."""
    steps = []
    while path is not None:
        path, step = path
        steps.append(f"[{step}]" if isinstance(step, int) else f".{step}")
    return ("".join(reversed(steps)).lstrip(".") or "the request body")[:200]


def _check_text(payload: Any) -> None:
    """Refuse a payload holding a string, key or value, that is not valid Unicode, naming where it is.

    Paths are kept as links to their parent's, not as strings, so that a deep body of long keys costs no
    more than its size to walk."""
    pending: list[tuple[Any, JsonPath]] = [(payload, None)]
    while pending:
        value, path = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if lone_surrogate(key) is not None:
                    raise RequestError(
                        f"{_where(path)}: a key holds a lone surrogate, which is no character; send valid "
                        "Unicode text."
                    )
                pending.append((item, (path, key)))
        elif isinstance(value, list):
            pending += [(item, (path, index)) for index, item in enumerate(value)]
        elif isinstance(value, str) and (surrogate := lone_surrogate(value)) is not None:
            raise RequestError(
                f"{_where(path)}: holds {surrogate!a}, a lone surrogate, which is no character; send valid "
                "Unicode text."
            )


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, read up to :data:`MAX_JSON_BYTES`, its text valid Unicode."""
    media = _media_type(request)
    if media != "application/json":
        raise RequestError(
            f"send the request body as Content-Type application/json, not {media or 'without a type'}.",
            status=415,
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise RequestError(f"request body over {MAX_JSON_BYTES // 1024} KB.", status=413)
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RequestError("the request body is not JSON.") from None
    except RecursionError:
        raise RequestError(
            "the request body nests lists or objects too deeply to read; send the object the route takes."
        ) from None
    except ValueError:  # an integer of more digits than Python converts
        raise RequestError(
            f"the request body holds a number of more than {sys.get_int_max_str_digits():,} digits."
        ) from None
    if not isinstance(payload, dict):
        raise RequestError("the request body must be a JSON object.")
    _check_text(payload)
    return payload


def _download_record(index: int, row: Any) -> dict[str, Any]:
    """Row ``index`` of a download, ``{"image", "caption", "prompt"}`` and an optional ``method``, as the
    line ``tipcap caption --out`` writes for it; a :class:`RequestError` naming the row's wrong field."""
    where = f"download: results[{index}]"
    if not isinstance(row, dict):
        raise RequestError(f'{where} must be an object, {{"image", "caption", "prompt"}}.')
    for key in ("image", "caption"):
        if not isinstance(row.get(key), str):
            raise RequestError(f"{where}.{key} must be text.")
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not all(isinstance(word, str) for word in prompt):
        raise RequestError(f'{where}.prompt must be a list of words, e.g. ["dog"] or [].')
    record = caption_record(CaptionResult(row["image"], row["caption"], prompt))
    if "method" in row:
        if not isinstance(row["method"], str):
            raise RequestError(f"{where}.method must be text.")
        record["method"] = row["method"]
    return record


def create_app(service: CaptionService, listening: Listening) -> Starlette:
    """The web app serving ``service`` and the page, answering requests to ``listening`` only."""

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def methods(request: Request) -> Response:
        return JSONResponse(service.describe())

    async def images(request: Request) -> Response:
        name = request.query_params.get("name") or "image"
        media = _media_type(request)
        if media not in (*IMAGE_TYPES, "application/octet-stream"):
            raise RequestError(
                f"{name}: sent as {media or 'no type'}; send the image's bytes as "
                f"{', '.join(IMAGE_TYPES)} or application/octet-stream.",
                status=415,
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > service.max_upload_bytes:
            raise RequestError(service.too_large(name, int(declared)), status=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > service.max_upload_bytes:
                raise RequestError(service.too_large(name, len(body)), status=413)
        return JSONResponse(await run_in_threadpool(service.add_image, name, bytes(body)))

    async def caption(request: Request) -> Response:
        payload = await _json_body(request)
        image_id, method = payload.get("image_id"), payload.get("method")
        if not isinstance(image_id, str) or not isinstance(method, str):
            raise RequestError("caption: give image_id and method.")
        result = await run_in_threadpool(
            service.caption, image_id, method, payload.get("prompt"), payload.get("beams", 3)
        )
        return JSONResponse(result)

    async def jsonl(request: Request) -> Response:
        rows = (await _json_body(request)).get("results")
        if not isinstance(rows, list):
            raise RequestError('download: give {"results": [{"image", "caption", "prompt"}, …]}.')
        lines = [json.dumps(_download_record(index, row)) + "\n" for index, row in enumerate(rows)]
        return Response(
            "".join(lines),
            media_type="application/jsonl",
            headers={"Content-Disposition": 'attachment; filename="captions.jsonl"'},
        )

    async def request_error(request: Request, error: Exception) -> Response:
        status = error.status if isinstance(error, RequestError) else 400
        return JSONResponse({"error": str(error)}, status_code=status)

    async def client_gone(request: Request, error: Exception) -> Response:
        # A closed tab or a dropped upload is no fault of the server's: a quiet note, no traceback.
        logger.info(
            "%s %s: the client left before sending its whole request.", request.method, request.url.path
        )
        return Response(status_code=400)  # uvicorn sends nothing to a client that has left

    routes = [
        Route("/", page),
        Route("/api/methods", methods),
        Route("/api/images", images, methods=["POST"]),
        Route("/api/caption", caption, methods=["POST"]),
        Route("/api/jsonl", jsonl, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_SameOrigin, listening=listening)],
        exception_handlers={TipcapError: request_error, ClientDisconnect: client_gone},
    )


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


def serve(
    service: CaptionService, host: str = "127.0.0.1", port: int = 8000, echo: Callable[[str], None] = print
) -> None:
    """Serve ``service`` until interrupted; ``echo`` receives the address bound once it listens. Listening
    elsewhere than on a loopback address is warned about: the server has no authentication."""
    sock = _bind(host, port)
    listening = Listening.of(host, sock)
    where = listening.url
    if listening.everywhere:
        where += f", every address of this machine (on it: {listening.local_url})"
    echo(f"serving {', '.join(service.models)} at {where} (Ctrl-C stops)")
    if not listening.loopback:
        reach = "every network interface" if listening.everywhere else listening.address
        logger.warning(
            "--host %s listens on %s: any machine that can reach this one can use the server, which asks "
            "no one who they are; pass --host 127.0.0.1 (the default) to serve this machine only.",
            host,
            reach,
        )
    uvicorn.Server(uvicorn.Config(create_app(service, listening), log_level="warning")).run(sockets=[sock])


@contextmanager
def serving(service: CaptionService, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``service`` from a background thread while the block runs; yields the page's address on this
    machine."""
    sock = _bind(host, port)
    listening = Listening.of(host, sock)
    server = uvicorn.Server(uvicorn.Config(create_app(service, listening), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server stopped while starting")
        time.sleep(0.01)
    try:
        yield listening.local_url
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
