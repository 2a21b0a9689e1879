"""The one exception type for mistakes a user can fix."""


class TipcapError(Exception):
    """A problem with the user's input or environment (bad path, malformed file, missing weights).

    The command line prints its message as a single line and exits non-zero, without a traceback,
    so the message must name the file or flag concerned and say what to do.
    """


class WeightsUnavailable(TipcapError):
    """Model weights named by a tag are not cached on this machine and cannot be downloaded now.

    Raised instead of a plain :class:`TipcapError` so that an optional consumer (the CLIP-S scorer) can
    skip its work with a warning, while a missing decoder CLIP still stops the command. ``reason`` says
    why they cannot be downloaded (``HF_HUB_OFFLINE is set``, or which host cannot be reached).
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason
