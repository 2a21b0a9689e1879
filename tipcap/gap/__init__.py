"""The modality gap: a Gaussian N(μ, Σ) estimated in four data settings, and the baseline kinds.

``Gap`` (model.py) maps embeddings across the gap; estimate.py fits μ and Σ per setting by streaming
over embedding chunks; fit.py does it from embedding stores; report.py summarises and draws a gap;
shape.py holds the figures of a gap's shape that report.py and atlas.py (``tipcap gap-atlas``) share.
"""

from tipcap.config import CAPDEC_SIGMA2, GAP_KINDS, SETTINGS
from tipcap.gap.estimate import (
    GapEstimate,
    Pairs,
    TensorRows,
    estimate_few_pairs,
    estimate_text_only,
    estimate_unpaired,
    estimate_web_pairs,
    estimate_web_pairs_mixture,
    fit_cosine_mixture,
    mutual_nearest_neighbours,
)
from tipcap.gap.fit import GapFit, estimate_gap, fit_gap, fit_gap_file, join_pairs, noise_covariance
from tipcap.gap.model import Gap
from tipcap.gap.moments import Moments, cholesky
from tipcap.gap.report import format_report, gap_report, plot_gap

__all__ = [
    "CAPDEC_SIGMA2",
    "GAP_KINDS",
    "SETTINGS",
    "Gap",
    "GapEstimate",
    "GapFit",
    "Moments",
    "Pairs",
    "TensorRows",
    "cholesky",
    "estimate_few_pairs",
    "estimate_gap",
    "estimate_text_only",
    "estimate_unpaired",
    "estimate_web_pairs",
    "estimate_web_pairs_mixture",
    "fit_cosine_mixture",
    "fit_gap",
    "fit_gap_file",
    "format_report",
    "gap_report",
    "join_pairs",
    "mutual_nearest_neighbours",
    "noise_covariance",
    "plot_gap",
]
