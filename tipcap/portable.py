"""Portable CPU arithmetic: pin the kernels whose floating-point results depend on the processor.

The same config and seed give the same bytes on one machine, but not across machines: on x86-64, torch
picks AVX2 or AVX-512 kernels (ATen's CPU capability), MKL and oneDNN pick code paths by processor model,
numpy dispatches its ufuncs to the widest instruction set, and reductions are split across as many threads
as the machine has cores. Each choice rounds differently, and a toy CLIP or decoder trained for a few hundred
steps turns those last-bit differences into other weights and other captions.

:func:`pin_cpu_arithmetic` sets, before torch and numpy are loaded, the environment that makes each of them
take one code path on every x86-64 processor:

- ``ATEN_CPU_CAPABILITY=default``: ATen's kernels compiled for the x86-64 baseline, not AVX2 or AVX-512;
- ``MKL_CBWR=COMPATIBLE``: MKL's conditional numerical reproducibility, its one code path for every
  Intel-compatible processor;
- ``ONEDNN_MAX_CPU_ISA=SSE41``: oneDNN's kernels (convolutions) no wider than SSE4.1;
- ``NPY_DISABLE_CPU_FEATURES``: numpy's baseline loops only (no AVX2/AVX-512 dispatch);
- ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` = :data:`THREADS`: the same split of every reduction, whatever
  the number of cores.

The bytes still depend on the versions of torch, numpy and the other packages, which is why the demo prints
them beside the digest of its table. The price is speed: the pinned kernels are scalar or SSE code.
"""

from __future__ import annotations

import os
import sys

THREADS = 2
"""Threads of every pinned run: a reduction split in two halves on every machine."""
PINS: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "NPY_DISABLE_CPU_FEATURES": "X86_V3,X86_V4,AVX512_ICL,AVX512_SPR",
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
}
"""The environment of a pinned run (see the module)."""
_READ_AT_LOAD = ("torch", "numpy")


def pin_cpu_arithmetic() -> str | None:
    """Set :data:`PINS` in this process's environment, before torch and numpy read it.

    Returns ``None`` when the pins are set, else why they could not be: the libraries that read them were
    loaded already (as in a test that imported torch before invoking the command line).
    """
    loaded = [name for name in _READ_AT_LOAD if name in sys.modules]
    if loaded:
        return f"{' and '.join(loaded)} loaded before the pins could be set"
    os.environ.update(PINS)
    return None


def pinned() -> bool:
    """Whether this process runs with the pins in force (torch loaded after them, on its baseline kernels)."""
    import torch

    in_environment = all(os.environ.get(name) == value for name, value in PINS.items())
    return (
        in_environment
        and torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        and torch.get_num_threads() == THREADS
    )


def versions() -> dict[str, str]:
    """The versions of the packages a pinned run's bytes depend on."""
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "numpy", "open_clip_torch", "transformers", "pillow")}
