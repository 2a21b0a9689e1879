"""``tipcap serve``: interactive captioning in the browser.

:mod:`tipcap.app.service` holds the models and the uploaded images and captions them, one request at a time;
:mod:`tipcap.app.server` is its HTTP interface (Starlette, served by uvicorn) and the page in ``static/``.
The web framework is an optional extra (``pip install -e '.[app]'``), imported only by the server module,
so this package adds nothing to ``import tipcap``.
"""
