"""Whether a server answers, found out within seconds: the check before any download or upload.

Hugging Face clients retry an unreachable host for minutes, and wait on one that accepts the connection
but never answers (a captive portal, a silent firewall) for longer still. One bounded HTTP request tells at
once, so that offline commands fail with a message instead of hanging. Kept apart from the modules that
need it so that commands reach the check without importing torch.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import urllib.error
import urllib.request
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 4.0
DEFAULT_HUB_HOST = "huggingface.co"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer: the probe does not follow it to another server."""

    def redirect_request(self, *args, **kwargs) -> None:
        return None


def _opener() -> urllib.request.OpenerDirector:
    # The probe sends no credentials and reads no body; the client that downloads afterwards verifies
    # the certificate. Verifying here too would call a server behind a private CA (which the client is
    # configured to trust) silent, so any TLS server that answers counts.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # Proxies come from the environment, as for huggingface_hub's own client.
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect)


def _why(error: BaseException) -> str:
    return str(getattr(error, "strerror", None) or error).strip() or type(error).__name__


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """``None`` when the HTTP(S) server of ``url`` answers a ``HEAD`` request within ``timeout`` seconds
    (DNS, TLS and the first status line included; any status counts), else what went wrong, as the rest
    of a sentence whose subject is the server: ``"cannot be reached (Connection refused)"``, ``"did not
    answer within 4 s"``."""
    outcome: list[str | None] = []
    silent = f"did not answer within {timeout:g} s"

    def ask() -> None:
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "tipcap"})
        try:
            with _opener().open(request, timeout=timeout):
                outcome.append(None)
        except urllib.error.HTTPError as e:  # a status line, even 404 or 503: the server answers
            e.close()
            outcome.append(None)
        except urllib.error.URLError as e:
            timed_out = isinstance(e.reason, TimeoutError)
            outcome.append(silent if timed_out else f"cannot be reached ({_why(e.reason)})")
        except TimeoutError:
            outcome.append(silent)
        except (http.client.HTTPException, OSError) as e:
            outcome.append(f"did not answer ({_why(e)})")
        except ValueError:
            outcome.append("is not an http:// or https:// URL")

    # A thread bounds the whole exchange, DNS included, which socket timeouts do not cover.
    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else silent


def hub_name() -> str:
    """How messages name the hub: its host when it is huggingface.co, else the endpoint and where it was
    set (huggingface_hub's ``ENDPOINT``, read from ``HF_ENDPOINT``)."""
    from huggingface_hub import constants

    if urlsplit(constants.ENDPOINT).hostname == DEFAULT_HUB_HOST:
        return DEFAULT_HUB_HOST
    return f"the hub endpoint {constants.ENDPOINT} (HF_ENDPOINT)"


def hub_unavailable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used now (``HF_HUB_OFFLINE`` set, or its endpoint not answering within
    ``timeout`` seconds), as a clause for a message; ``None`` when it answers."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    problem = probe(constants.ENDPOINT + "/", timeout)
    return None if problem is None else f"{hub_name()} {problem}"
