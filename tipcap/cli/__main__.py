"""``python -m tipcap.cli``: the ``tipcap`` command (as torchrun and the tests start it)."""

from tipcap.cli import main

main()
