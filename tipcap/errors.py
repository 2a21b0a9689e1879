"""The one exception type for mistakes a user can fix."""


class TipcapError(Exception):
    """A problem with the user's input or environment (bad path, malformed file, missing weights).

    The command line prints its message as a single line and exits non-zero, without a traceback,
    so the message must name the file or flag concerned and say what to do.
    """
