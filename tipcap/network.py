"""Whether a host answers, found out within seconds: the check before any download or upload.

Hugging Face clients retry an unreachable host for minutes; one bounded TCP connection tells at once, so
that offline commands fail with a message instead of hanging. Kept apart from the modules that need it so
that commands reach the check without importing torch.
"""

from __future__ import annotations

import socket
import threading

PROBE_TIMEOUT_S = 4.0


def host_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (DNS included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # A thread bounds the DNS lookup too, which socket timeouts do not cover.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
