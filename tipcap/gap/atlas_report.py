"""The gap atlas on a terminal and on a page: a short table, and a one-page PNG (the spectrum of Σ, axis
concentration, each kind's cosine shells at training and at inference), drawn from the atlas document
alone (:func:`tipcap.gap.atlas.gap_atlas`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tipcap.config import CAPDEC_SIGMA2
from tipcap.io import atomic_path, write_json_atomic

ATLAS_JSON = "atlas.json"
ATLAS_PNG = "atlas.png"


def _figure(interval: dict[str, float | None], digits: int = 3) -> str:
    """``value [low, high]``, or ``-`` where there is no value."""
    if interval["value"] is None:
        return "-"
    if interval["low"] is None:
        return f"{interval['value']:.{digits}f}"
    return f"{interval['value']:.{digits}f} [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"


def format_atlas(atlas: dict[str, Any]) -> str:
    """The atlas as aligned lines for a terminal: the gap's figures, then one row per kind."""
    settings, pairs, gap = atlas["settings"], atlas["pairs"], atlas["gap"]
    level = round(100 * settings["confidence"])
    percent = ", ".join(f"{round(100 * f)}%" for f in atlas["concentration"]["fractions"])
    lines = [
        f"gap atlas: {pairs['drawn']:,} pairs of {pairs['available']:,} ({pairs['images']:,} images), d = "
        f"{atlas['dim']}; {level}% intervals: moments jackknifed over {pairs['groups']} image groups, "
        f"scores from {settings['resamples']} bootstrap resamples",
        f"  ||mu||              {_figure(gap['mu_norm'])}",
        f"  tr Sigma            {_figure(gap['trace'])}",
        f"  mean's share        {_figure(gap['mean_share'])}  (||mu||^2 / E||delta||^2)",
        f"  effective rank      {_figure(gap['effective_rank'], 1)}  (participation ratio (tr S)^2 / tr S^2)",
        f"  captions' share     {_figure(gap['caption_share'])}  (of delta's variance, shared by an image's "
        "captions)",
        f"  cos matched         {_figure(atlas['cosines']['matched'])}",
        f"  cos images          {_figure(atlas['cosines']['between_images'])}",
        f"  cos captions        {_figure(atlas['cosines']['between_captions'])}",
        f"  top {percent} axes: mean "
        + ", ".join(f"{x['value']:.2f}" for x in atlas["concentration"]["mean"])
        + " (random direction "
        + ", ".join(f"{x:.2f}" for x in atlas["concentration"]["mean_random_direction"])
        + ")"
        + "; variance "
        + ", ".join(f"{x['value']:.2f}" for x in atlas["concentration"]["variance"]),
        "  excess kurtosis     "
        + ", ".join(f"{x['value']:.2f}" for x in atlas["kurtosis"])
        + " (top principal directions)",
        f"  {'kind':<24}{'held-out loglik/dim':<30}{'scale':>7}{'cos train':>11}{'cos infer':>11}{'KS':>7}",
    ]
    for kind, row in atlas["kinds"].items():
        scale = row["held_out_noise_scale"]["value"]
        lines.append(
            f"  {kind:<24}{_figure(row['held_out_log_likelihood']):<30}"
            f"{'-' if scale is None else f'{scale:.3g}':>7}"
            f"{row['training_cosine']['mean']['value']:>11.3f}{row['inference_cosine']['mean']['value']:>11.3f}"
            f"{row['shell_distance']:>7.3f}"
        )
    prediction = atlas["prediction"]
    lines.append(
        f"  prediction: {prediction['kind']} at noise scale {prediction['noise_scale']:.3g} (best in "
        f"{100 * prediction['best_in_resamples']:.0f}% of resamples); ranking "
        + " > ".join(prediction["ranking"])
    )
    return "\n".join(lines)


def plot_atlas(atlas: dict[str, Any], path: str | Path) -> None:
    """Save the atlas's one-page PNG: the spectrum of Σ, axis concentration, and the cosine shells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1, 0.8, 1.6]})
    ax = axes[0]
    eigenvalues = [max(x, 1e-12) for x in atlas["gap"]["spectrum"]]
    ax.semilogy(range(1, len(eigenvalues) + 1), eigenvalues, label="eigenvalues of Sigma")
    ax.axhline(
        CAPDEC_SIGMA2, color="tab:red", linestyle="--", label=f"CapDec's per-axis σ² = {CAPDEC_SIGMA2}"
    )
    rank = atlas["gap"]["effective_rank"]["value"]
    ax.set_title(f"Spectrum of Sigma (trace {atlas['gap']['trace']['value']:.3g}, eff. rank {rank:.1f})")
    ax.set_xlabel("component")
    ax.set_ylabel("variance")
    ax.legend()

    ax = axes[1]
    fractions = atlas["concentration"]["fractions"]
    positions = range(len(fractions))
    for offset, (name, color) in zip(
        (-0.2, 0.2), (("mean", "tab:blue"), ("variance", "tab:orange")), strict=True
    ):
        shares = atlas["concentration"][name]
        values = [x["value"] for x in shares]
        # Percentile intervals need not contain the point estimate: bars reach the interval's nearer end.
        errors = [
            [max(x["value"] - (x["low"] if x["low"] is not None else x["value"]), 0.0) for x in shares],
            [max((x["high"] if x["high"] is not None else x["value"]) - x["value"], 0.0) for x in shares],
        ]
        label = "share of ||mu||^2" if name == "mean" else "share of diag Sigma"
        ax.bar([p + offset for p in positions], values, 0.4, yerr=errors, color=color, label=label)
    reference = atlas["concentration"]["mean_random_direction"]
    ax.scatter(
        [p - 0.2 for p in positions], reference, marker="_", s=300, color="navy", label="mu on random axes"
    )
    ax.scatter(
        [p + 0.2 for p in positions], fractions, marker="_", s=300, color="black", label="equal variances"
    )
    ax.set_xticks(list(positions), [f"top {round(100 * f)}%" for f in fractions])
    ax.set_ylim(0, 1)
    ax.set_title("Axis concentration")
    ax.legend()

    ax = axes[2]
    kinds = list(atlas["kinds"])
    for k, kind in enumerate(kinds):
        for offset, side, color in (
            (-0.17, "training_cosine", "tab:green"),
            (0.17, "inference_cosine", "tab:purple"),
        ):
            q = atlas["kinds"][kind][side]["quantiles"]
            x = k + offset
            ax.vlines(x, q[0], q[-1], color=color, linewidth=1)
            ax.vlines(x, q[1], q[3], color=color, linewidth=7)
            ax.scatter([x], [q[2]], color="white", edgecolors=color, zorder=3, s=18)
    ax.plot([], [], color="tab:green", linewidth=7, label="training: cos(t + noise, t)")
    ax.plot([], [], color="tab:purple", linewidth=7, label="inference: cos(mapped v, t)")
    ax.set_xticks(range(len(kinds)), [kind.replace("mean-isotropic-", "") for kind in kinds], fontsize=8)
    ax.set_ylabel("cosine to the clean caption (5-25-50-75-95%)")
    prediction = atlas["prediction"]
    ax.set_title(
        f"Cosine shells per kind; predicted: {prediction['kind']} at scale {prediction['noise_scale']:.3g}"
    )
    ax.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    with atomic_path(Path(path)) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def write_atlas(atlas: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``atlas.json`` (atomically) and ``atlas.png`` into the folder ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    document, picture = out / ATLAS_JSON, out / ATLAS_PNG
    write_json_atomic(document, atlas)
    plot_atlas(atlas, picture)
    return document, picture
