"""The ``tipcap`` command line: a thin layer over the library, one module per group of commands.

Library modules are imported inside each command, so ``tipcap --help`` answers at once and a command
pays only for what it uses; :mod:`tipcap.config` alone is imported up front, since the options of the stage
commands are made from its dataclasses (:mod:`tipcap.cli.options`). A
:class:`~tipcap.errors.TipcapError` becomes one ``Error:`` line.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any

import click

from tipcap import __version__
from tipcap.cli.threads import choose_wait_policy
from tipcap.errors import TipcapError


class _Once(logging.Filter):
    """Lets each distinct message through once.

    Stages of one command that load the same thing warn alike (``evaluate`` loads its CLIP to embed the
    images and again to caption them); the repeat says nothing new.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


class _Group(click.Group):
    """The root group: sets up warnings, each given once per command, and reports user errors as one line,
    without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from tqdm.contrib.logging import logging_redirect_tqdm

        log = logging.getLogger("tipcap")
        if not log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("warning: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.WARNING)
            log.propagate = False
        once: list[logging.Handler] = []
        try:
            # Warnings go through tqdm so that they do not break a progress bar's line.
            with logging_redirect_tqdm(loggers=[log]):
                # On the handlers in force, which see the records of tipcap's modules too (a logger's own
                # filters do not); one filter each, since every handler sees every record.
                once = list(log.handlers)
                for handler in once:
                    handler.addFilter(_Once())
                return super().invoke(ctx)
        except TipcapError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(os_error_message(e)) from None
        finally:
            for handler in once:
                handler.filters = [f for f in handler.filters if not isinstance(f, _Once)]


_OS_ERROR_ADVICE = {
    errno.EACCES: "check its permissions, or choose another folder with --out",
    errno.EPERM: "check its permissions, or choose another folder with --out",
    errno.EROFS: "the file system is read-only; choose a writable folder with --out",
    errno.ENOSPC: "the disk is full; free some space or choose another --out, then rerun",
    errno.EDQUOT: "the disk quota is exhausted; free some space or choose another --out, then rerun",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "expected a file, found a folder; check the path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) and rerun",
}


def os_error_message(error: OSError) -> str:
    """One line for an operating-system failure: the file, what went wrong and what to do."""
    where = error.filename if error.filename is not None else "a file"
    what = error.strerror or str(error)
    advice = _OS_ERROR_ADVICE.get(error.errno, "check the file and the disk, then rerun")
    return f"{where}: {what}; {advice}."


def _set_threads(threads: int | None, command: str | None) -> None:
    """Threads for torch's CPU operations, and how idle ones wait (:mod:`tipcap.cli.threads`): both are
    read when torch loads, which the commands do after this."""
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    choose_wait_policy(command)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tipcap")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    envvar="TIPCAP_THREADS",
    help="CPU threads per process (default: torch's, one per core; env TIPCAP_THREADS). When several "
    "processes share the machine, cores divided by processes is a good choice.",
)
@click.pass_context
def main(context: click.Context, threads: int | None) -> None:
    """tipcap: image captioning from text data, across the CLIP modality gap."""
    _set_threads(threads, context.invoked_subcommand)


def _register() -> None:
    """Add each module's commands to the root group."""
    from tipcap.cli import caption, embed, evaluate, gap, grid, hub, prepare, reproduce, serve, toy, train

    for command in (
        prepare.prepare_group, embed.embed_group, gap.fit_gap_command, train.train_command,
        caption.caption_command, evaluate.score_command, evaluate.evaluate_command, hub.push_command,
        toy.toyworld_command, toy.demo_command, grid.ablate_command, grid.compare_command,
        serve.serve_command, gap.gap_atlas_command, reproduce.reproduce_command,
    ):  # fmt: skip
        main.add_command(command)


_register()
