"""Ablations: a grid of data settings × gap kinds × prompt modes × seeds (× few-pairs shares), one protocol.

:mod:`tipcap.grid.config` describes a grid and :mod:`tipcap.grid.validate` reads and checks it;
:mod:`tipcap.grid.runner` plans its steps (:mod:`tipcap.grid.steps`) and runs them, reusing each one whose
provenance key is unchanged, and :mod:`tipcap.grid.report` writes its results, table and plots.
"""

from tipcap.grid.config import BASELINES, CELL_KINDS, AblationConfig, Cell, Job, expand
from tipcap.grid.models import trained_models
from tipcap.grid.report import (
    METRIC_COLUMNS,
    SETTING_COLOURS,
    markdown_table,
    plot_cider,
    plot_cider_vs_pairs,
    result_columns,
    write_csv,
)
from tipcap.grid.runner import Ablation, run_ablation
from tipcap.grid.validate import load_ablation

__all__ = [
    "BASELINES",
    "CELL_KINDS",
    "METRIC_COLUMNS",
    "SETTING_COLOURS",
    "Ablation",
    "AblationConfig",
    "Cell",
    "Job",
    "expand",
    "load_ablation",
    "markdown_table",
    "plot_cider",
    "plot_cider_vs_pairs",
    "result_columns",
    "run_ablation",
    "trained_models",
    "write_csv",
]
