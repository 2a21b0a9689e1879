"""``tipcap serve``: caption images in the browser (the app extra)."""

from __future__ import annotations

import click

from tipcap.cli.options import FiniteFloatRange
from tipcap.errors import TipcapError


@click.command("serve")
@click.option(
    "--model",
    "models",
    multiple=True,
    type=click.Path(file_okay=False),
    help="A model directory, or a folder of them (the output of tipcap demo or ablate); repeatable.",
)
@click.option("--demo", is_flag=True, help="Serve the models tipcap demo trained (in runs/demo).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: a free one)."
)
@click.option(
    "--max-upload-mb",
    default=10.0,
    show_default=True,
    # At least a small PNG's size; at most what the server should hold in memory for one upload.
    type=FiniteFloatRange(min=0.01, max=1024),
    help="Largest image accepted, in MB (0.01 to 1024).",
)
@click.option("--device", default=None, help="Device (default: cuda when available, else cpu).")
def serve_command(
    models: tuple[str, ...], demo: bool, host: str, port: int, max_upload_mb: float, device: str | None
) -> None:
    """Caption images in the browser, with prompt words at a click; prints the page's address."""
    try:
        from tipcap.app.server import serve
    except ImportError as e:
        raise TipcapError(
            f"tipcap serve needs the app extra ({e}); pip install -e '.[app]' in tipcap's clone."
        ) from None
    from tipcap.app.service import CaptionService, load_models

    paths = [*models, *(["runs/demo"] if demo else [])]
    if not paths:
        raise TipcapError("serve: give --model DIR, or --demo to serve the models tipcap demo trained.")
    service = CaptionService(load_models(paths, device), max_upload_bytes=int(max_upload_mb * 2**20))
    serve(service, host, port, echo=click.echo)
