"""tipcap: text-data-centric image captioning with a Gaussian model of the CLIP modality gap.

The package root stays import-light (no torch) so that the command line answers ``--help`` and
reuses cached embedding stores quickly; the library lives in its submodules.
"""

__version__ = "0.1.0"
