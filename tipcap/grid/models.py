"""The decoders a grid's output folder holds, for the web app's model list."""

from __future__ import annotations

from pathlib import Path

from tipcap.io import load_json


def trained_models(out: str | Path) -> dict[str, Path]:
    """The finished decoders in a grid's output folder: ``{"<job>-seed<N>": model directory}``, in the
    order of the grid's cells (as ``grid.json`` records them), then by name."""
    out = Path(out)
    found = {path.parent.parent.name: path.parent for path in out.glob("runs/*/model/config.json")}
    cells = list(load_json(out / "grid.json")["cells"]) if (out / "grid.json").is_file() else []

    def rank(name: str) -> int:
        # A run is named after its job, which starts with its cell's name; the longest such name wins.
        owners = [cells.index(cell) for cell in sorted(cells, key=len) if name.startswith(f"{cell}-")]
        return owners[-1] if owners else len(cells)

    return {name: found[name] for name in sorted(found, key=lambda name: (rank(name), name))}
