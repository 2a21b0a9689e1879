"""What a fitted gap looks like: summary figures and a picture (PCA of the embeddings, spectrum of Σ).

The figures come from :mod:`tipcap.gap.shape`, which ``tipcap gap-atlas`` measures with too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from tipcap.config import CAPDEC_SIGMA2
from tipcap.gap.estimate import Pairs
from tipcap.gap.model import TRAIN_NOISE_KINDS, Gap
from tipcap.gap.shape import effective_rank, pair_cosines, sample_pairs, spectrum
from tipcap.io import atomic_path

_INFO_KEYS = (
    "sigma2", "close_noise_variance", "scale_to_dim", "source_variance", "source_dim", "match",
    "tangential_gaussian", "tangential_total_match", "rotation_seed",
)  # fmt: skip
"""Options of a kind's fit that the report repeats from the gap's info when the fit recorded them."""


def gap_report(gap: Gap, pairs: Pairs | None = None, limit: int = 20_000) -> dict[str, Any]:
    """Summary figures of a gap, and how far it closes the gap on matched pairs when given.

    ``sigma_trace`` (the total variance), ``top_eigenvalues`` and ``effective_rank`` (the participation
    ratio, :func:`effective_rank`) describe the covariance of the training noise the kind adds (zero for
    kinds without noise); ``noise_sq_norm_sd`` the spread of its squared norms, sd ‖n‖² = sqrt(2 tr S²) for
    n = L·z with S = LLᵀ (also ``norm-matched``'s, whose norms are ‖L·z‖); ``fitted_trace`` and
    ``fitted_effective_rank`` the setting's estimate of Σ it came from. ``sigma2`` is the per-axis
    variance of the kinds that take one (with ``scale_to_dim``, carried from ``source_variance`` at
    ``source_dim``); ``tangential_gaussian`` and ``tangential_total_match`` the expected noise left
    tangent to the captions by the Gaussian and by isotropic noise of Σ's trace (``match: tangential``).
    ``mismatched_fraction`` is the share of web pairs the mixture estimator believes mismatched.
    ``cosine_before`` is the mean cos(v, t) over matched pairs; ``cosine_after`` the mean cosine between
    the two sides as the decoder sees them (``to_text(v)`` against ``text_side(t)``).
    """
    with torch.no_grad():
        eigenvalues = spectrum(gap.training_noise_covariance)
        norms_from = gap.covariance.double() if gap.kind in TRAIN_NOISE_KINDS else None
        report: dict[str, Any] = {
            "kind": gap.kind,
            "setting": gap.info.get("setting"),
            "dim": gap.dim,
            "mu_norm": float(gap.mu.norm()),
            "sigma_trace": float(eigenvalues.sum()),
            "top_eigenvalues": [float(x) for x in eigenvalues[:5]],
            "effective_rank": effective_rank(eigenvalues),
            "noise_sq_norm_sd": 0.0 if norms_from is None else math.sqrt(2 * float((norms_from**2).sum())),
            "noise_scale": gap.info.get("noise_scale", 1.0),
            "fitted_trace": gap.info.get("fitted_trace"),
            "fitted_effective_rank": gap.info.get("fitted_effective_rank"),
            "pairs_used": gap.info.get("pairs_used"),
            "pairs_discarded": gap.info.get("pairs_discarded"),
            "mismatched_fraction": gap.info.get("mismatched_fraction"),
            "shrinkage": gap.info.get("shrinkage"),
        }
        for key in _INFO_KEYS:
            if key in gap.info:
                report[key] = gap.info[key]
        if pairs is not None and len(pairs) > 0:
            v, t = sample_pairs(pairs, limit)
            report["matched_pairs"] = len(v)
            report["cosine_before"] = float(pair_cosines(v, t).mean())
            report["cosine_after"] = float(pair_cosines(gap.to_text(v), gap.text_side(t)).mean())
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as aligned lines for a terminal."""
    lines = [
        f"gap kind {report['kind']}, setting {report['setting']}, d = {report['dim']}",
        f"  ||mu||            {report['mu_norm']:.4f}",
        f"  noise trace       {report['sigma_trace']:.4f} (total variance of the training noise, "
        f"noise_scale {report.get('noise_scale', 1.0):g})",
        f"  top eigenvalues   {', '.join(f'{x:.3g}' for x in report['top_eigenvalues'])}",
        f"  effective rank    {report['effective_rank']:.1f} of {report['dim']} "
        "(participation ratio (tr S)^2 / tr(S^2) of the noise)",
    ]
    if report.get("noise_sq_norm_sd"):
        lines.append(
            f"  noise norms       sd(||n||^2) {report['noise_sq_norm_sd']:.4f} "
            "(||n|| = ||Lz||: sqrt(2 tr (LL^T)^2))"
        )
    for key, name in (("sigma2", "sigma^2"), ("close_noise_variance", "CLOSE's 0.12^2")):
        if report.get(key) is not None:
            source = ""
            if report.get("scale_to_dim"):
                source = (
                    f" (scaled to d = {report['dim']} from {report['source_variance']:g} "
                    f"at d = {report['source_dim']}, the same expected cosine)"
                )
            lines.append(f"  {name:<17} {report[key]:.4g} per axis{source}")
    if report.get("tangential_gaussian") is not None:
        lines.append(
            f"  tangential noise  {report['tangential_gaussian']:.4f} the Gaussian's and this kind's, "
            f"{report['tangential_total_match']:.4f} with tr(Sigma)/d (match {report['match']})"
        )
    if report.get("rotation_seed") is not None:
        lines.append(f"  rotation seed     {report['rotation_seed']} (Sigma's spectrum, random directions)")
    if report.get("fitted_trace") is not None:
        lines.append(
            f"  fitted Sigma      trace {report['fitted_trace']:.4f}, "
            f"effective rank {report['fitted_effective_rank']:.1f}"
        )
    if report.get("pairs_used") is not None:
        lines.append(
            f"  pairs used        {report['pairs_used']:,} ({report['pairs_discarded'] or 0:,} discarded)"
        )
    if report.get("mismatched_fraction") is not None:
        lines.append(
            f"  mismatched pairs  {report['mismatched_fraction']:.3f} (estimated share of web pairs)"
        )
    if report.get("shrinkage") is not None:
        lines.append(f"  shrinkage         {report['shrinkage']:.3f} (Ledoit-Wolf)")
    if "cosine_before" in report:
        lines.append(
            f"  mean cos(v, t)    {report['cosine_before']:.4f} before -> {report['cosine_after']:.4f} after "
            f"the mapping ({report['matched_pairs']:,} matched pairs)"
        )
    return "\n".join(lines)


def plot_gap(gap: Gap, pairs: Pairs | None, path: str | Path, points: int = 1500) -> None:
    """Save a PNG: a 2-D PCA of image, text and mapped image embeddings, and the spectrum of Σ.

    The PCA panel needs matched pairs; without them only the spectrum is drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    with torch.no_grad():
        eigenvalues = spectrum(gap.covariance).clamp(min=1e-12)
        figure, axes = plt.subplots(
            1, 2 if pairs is not None else 1, figsize=(12 if pairs is not None else 6, 5)
        )
        axes = list(axes) if pairs is not None else [axes]
        if pairs is not None:
            v, t = sample_pairs(pairs, points)
            mapped = gap.to_text(v)
            text_side = gap.text_side(t)
            data = torch.cat([v, t, mapped, text_side])
            center = data.mean(0)
            _, _, basis = torch.linalg.svd(data - center, full_matrices=False)
            project = lambda x: ((x - center) @ basis[:2].T).numpy()  # noqa: E731
            ax = axes[0]
            for values, label, color in ((v, "image v", "tab:blue"), (t, "text t", "tab:orange")):
                xy = project(values)
                ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.4, label=label, color=color)
            # Rings: where the mapping works they land on the text points, which filled dots would hide.
            xy = project(mapped)
            ax.scatter(xy[:, 0], xy[:, 1], s=14, facecolors="none", edgecolors="tab:green", linewidths=0.6,
                       alpha=0.7, label="mapped image (decoder input)")  # fmt: skip
            ax.set_title(f"PCA of {len(v)} matched pairs ({gap.kind}, {gap.info.get('setting')})")
            ax.set_xlabel("PC 1")
            ax.set_ylabel("PC 2")
            ax.legend(markerscale=4)
        ax = axes[-1]
        ax.semilogy(range(1, len(eigenvalues) + 1), eigenvalues.numpy(), label="eigenvalues of Sigma")
        # A reference level: the per-axis variance of CapDec's isotropic noise (the isotropic kind).
        ax.axhline(
            CAPDEC_SIGMA2, color="tab:red", linestyle="--", label=f"CapDec's per-axis σ² = {CAPDEC_SIGMA2}"
        )
        ax.set_title(f"Spectrum of Sigma (trace {float(eigenvalues.sum()):.3g})")
        ax.set_xlabel("component")
        ax.set_ylabel("variance")
        ax.legend()
        figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
