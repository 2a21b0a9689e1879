"""tipcap: text-data-centric image captioning with a Gaussian model of the CLIP modality gap.

``from tipcap import TIPCap`` gives the caption model (:class:`tipcap.model.TIPCap`). The package root
stays import-light (no torch until the model is asked for) so that the command line answers ``--help``
and reuses cached embedding stores quickly; the library lives in its submodules.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["TIPCap", "__version__"]


def __getattr__(name: str) -> Any:
    # The model module imports torch and transformers: load it only when it is asked for.
    if name == "TIPCap":
        from tipcap.model import TIPCap

        return TIPCap
    raise AttributeError(f"module 'tipcap' has no attribute {name!r}")
