"""`tipcap fit-gap` on stores made by `tipcap embed` (tiny CLIP, real COCO captions, generated images)."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tipcap.cli import main
from tipcap.cli.gap import fit_gap_command
from tipcap.gap import GAP_KINDS, SETTINGS, Gap


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_clip, other_clip):
    """Caption and image stores of the COCO slice (24 images, 120 captions); images of another CLIP."""
    from conftest import COCO_SLICE

    root = tmp_path_factory.mktemp("stores")
    document = json.loads(COCO_SLICE.read_text())
    for number, image in enumerate(document["images"]):
        path = root / "coco" / image["filepath"] / image["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), ((53 * number) % 256, (97 * number) % 256, (31 * number) % 256)).save(path)
    common = ("--pretrained", "none", "--no-progress")
    assert (
        run(
            "embed", "texts", "--corpus", COCO_SLICE, "--clip", tiny_clip, "--out", root / "texts", *common
        ).exit_code
        == 0
    )
    for clip, out in ((tiny_clip, "images"), (other_clip, "other-images")):
        result = run("embed", "images", "--images", COCO_SLICE, "--image-root", root / "coco", "--clip", clip,
                     "--out", root / out, "--workers", "0", *common)  # fmt: skip
        assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize("setting", ["few-pairs", "web-pairs", "unpaired"])
def test_fit_gap_in_each_paired_setting(stores, tmp_path, setting):
    out, plot = tmp_path / "gap.safetensors", tmp_path / "gap.png"
    result = run("fit-gap", "--setting", setting, "--texts", stores / "texts", "--images", stores / "images",
                 "--out", out, "--plot", plot)  # fmt: skip
    assert result.exit_code == 0, result.output
    for line in (
        "||mu||",
        "noise trace",
        "top eigenvalues",
        "effective rank",
        "pairs used",
        "mean cos(v, t)",
    ):
        assert line in result.stdout
    gap = Gap.load(out)
    assert gap.kind == "gaussian" and gap.info["setting"] == setting and gap.dim == 32
    assert gap.info["report"]["cosine_after"] > gap.info["report"]["cosine_before"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    if setting == "few-pairs":
        assert gap.info["pairs_used"] == 120 and gap.info["pairs_discarded"] == 0


DEFAULT_KINDS = [("few-pairs", "gaussian"), ("web-pairs", "gaussian"), ("unpaired", "gaussian"),
                 ("text-only", "isotropic")]  # fmt: skip


@pytest.mark.parametrize(("setting", "kind"), DEFAULT_KINDS)
def test_fit_gap_without_kind_works_in_each_setting(stores, tmp_path, setting, kind):
    """The kind a setting gets when none is named is one it can fit, and the command says which."""
    out = tmp_path / "gap.safetensors"
    images = () if setting == "text-only" else ("--images", stores / "images")
    result = run("fit-gap", "--setting", setting, "--texts", stores / "texts", *images, "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"--kind not given: {kind}, ")
    gap = Gap.load(out)
    assert gap.kind == kind and gap.info["setting"] == setting


def test_text_only_imports_mu(stores, tmp_path):
    paired = tmp_path / "paired.safetensors"
    result = run("fit-gap", "--setting", "few-pairs", "--texts", stores / "texts",
                 "--images", stores / "images", "--out", paired)  # fmt: skip
    assert result.exit_code == 0
    out = tmp_path / "text-only.safetensors"
    result = run("fit-gap", "--setting", "text-only", "--kind", "mean-shift-isotropic",
                 "--texts", stores / "texts", "--mu-from", paired, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    gap, source = Gap.load(out), Gap.load(paired)
    assert (gap.mu == source.mu).all()
    assert (gap.covariance.diagonal() - 0.016).abs().max() < 1e-6
    # Text-only fits no covariance, so the report does not present σ₀²I as one.
    assert gap.info["report"]["fitted_trace"] is None and "fitted Sigma" not in result.stdout
    # Without --kind, an imported mu makes text-only's Gaussian N(mu, sigma2·I).
    result = run("fit-gap", "--setting", "text-only", "--texts", stores / "texts", "--mu-from", paired,
                 "--out", tmp_path / "default.safetensors")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Gap.load(tmp_path / "default.safetensors").kind == "mean-shift-isotropic"


@pytest.mark.parametrize("setting", ["few-pairs", "web-pairs", "unpaired"])
@pytest.mark.parametrize(
    "kind",
    ["mean-shift", "mean-shift-isotropic", "capdec-offset", "mean-isotropic-matched", "norm-matched",
     "diagonal", "rotated", "close"],
)  # fmt: skip
def test_factor_kinds_in_each_setting(stores, tmp_path, kind, setting):
    """Each control kind fits in each setting with images; the file and the report give ||mu||, the
    noise's total variance and its effective rank."""
    out = tmp_path / "gap.safetensors"
    result = run("fit-gap", "--setting", setting, "--kind", kind, "--texts", stores / "texts",
                 "--images", stores / "images", "--out", out, "--noise-scale", "0.5")  # fmt: skip
    assert result.exit_code == 0, result.output
    gap = Gap.load(out)
    report = gap.info["report"]
    assert gap.kind == kind and gap.info["setting"] == setting and report["noise_scale"] == 0.5
    assert report["mu_norm"] == pytest.approx(float(gap.mu.norm()), rel=1e-5) and report["mu_norm"] > 0
    noise = 0.0 if kind == "mean-shift" else float(gap.covariance.double().trace())
    assert report["sigma_trace"] == pytest.approx(noise, rel=1e-4, abs=1e-9)
    if kind in ("mean-shift-isotropic", "capdec-offset"):
        assert report["sigma_trace"] == pytest.approx(0.5 * 0.016 * 32, rel=1e-4)
    if kind in ("mean-isotropic-matched", "norm-matched", "rotated"):  # Σ's trace, times the scale
        assert report["sigma_trace"] == pytest.approx(0.5 * report["fitted_trace"], rel=1e-4)
    if kind in ("mean-isotropic-matched", "norm-matched"):
        assert report["sigma_trace"] == pytest.approx(0.5 * report["fitted_trace"], rel=1e-4)
        assert report["effective_rank"] == pytest.approx(32, rel=1e-4)
    expected_lines = (f"||mu||            {report['mu_norm']:.4f}", "effective rank", "participation ratio",
                      f"noise trace       {report['sigma_trace']:.4f}")  # fmt: skip
    for text in expected_lines:
        assert text in result.stdout
    if setting == "web-pairs":
        # A random CLIP's images of flat colours are no more like their own captions than like others': the
        # mixture finds no matched component, takes the pairs as clean and keeps every one.
        assert report["mismatched_fraction"] == 0.0 and gap.info["mixture"]["mismatched"] == 0.0
        assert (report["pairs_used"], report["pairs_discarded"]) == (120, 0)
        assert "mismatched pairs  0.000 (estimated share of web pairs)" in result.stdout


def test_fit_gap_rotated_has_the_gaussians_spectrum_in_other_directions(stores, tmp_path):
    """`--kind rotated` against `--kind gaussian` on the same stores: the eigenvalues of the two noise
    covariances agree (float32 factors, so to 1e-6 relative), and the leading eigenvectors do not."""
    common = ("--setting", "few-pairs", "--texts", stores / "texts", "--images", stores / "images")
    covariances = {}
    for kind in ("gaussian", "rotated"):
        out = tmp_path / f"{kind}.safetensors"
        result = run("fit-gap", *common, "--kind", kind, "--seed", 5, "--out", out)
        assert result.exit_code == 0, result.output
        scale_tril = Gap.load(out).scale_tril.double()
        covariances[kind] = scale_tril @ scale_tril.T
    assert "rotation seed     5" in result.stdout
    gaussian, rotated = (torch.linalg.eigh(covariances[kind]) for kind in ("gaussian", "rotated"))
    spread = torch.linalg.vector_norm(rotated.eigenvalues - gaussian.eigenvalues)
    assert float(spread / torch.linalg.vector_norm(gaussian.eigenvalues)) < 1e-6
    # The top three eigenvectors of one against those of the other: a rotation that kept Σ's directions
    # would give |cos| ≈ 1; random directions in d = 32 give about 1/sqrt(32).
    cosines = (rotated.eigenvectors[:, -3:].T @ gaussian.eigenvectors[:, -3:]).abs()
    assert float(cosines.max()) < 0.7, cosines


@pytest.mark.parametrize(
    "kind",
    ["mean-isotropic-matched", "norm-matched", "diagonal", "rotated", "gaussian", "close", "mean-shift",
     "mean-shift-isotropic", "capdec-offset"],
)  # fmt: skip
def test_text_only_refuses_kinds_without_their_inputs(stores, tmp_path, kind):
    out = tmp_path / "gap.safetensors"
    result = run(
        "fit-gap", "--setting", "text-only", "--kind", kind, "--texts", stores / "texts", "--out", out
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and f"gap kind '{kind}'" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("kind", ["none", "isotropic", "mean-shift", "cov-noise", "memory"])
def test_baseline_kinds(stores, tmp_path, kind):
    out = tmp_path / "gap.safetensors"
    result = run("fit-gap", "--setting", "few-pairs", "--kind", kind, "--texts", stores / "texts",
                 "--images", stores / "images", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    gap = Gap.load(out)
    assert gap.kind == kind
    if kind == "memory":
        assert gap.memory.shape == (120, 32)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--setting", "few-pairs", "--images", "{other}"), "different CLIPs"),
        (("--setting", "unpaired"), "needs --images"),
        (("--setting", "few-pairs", "--images", "{texts}"), "is not an image store"),
        (("--setting", "text-only", "--kind", "none", "--learnable"), "--learnable"),
    ],
)
def test_fit_gap_errors(stores, tmp_path, args, message):
    paths = {"other": stores / "other-images", "texts": stores / "texts", "images": stores / "images"}
    args = [a.format(**paths) for a in args]
    result = run("fit-gap", "--texts", stores / "texts", "--out", tmp_path / "gap.safetensors", *args)
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "gap.safetensors").exists()


def test_fit_gap_refuses_a_drop_quantile_outside_its_range(stores, tmp_path):
    result = run("fit-gap", "--texts", stores / "texts", "--images", stores / "images",
                 "--setting", "web-pairs", "--drop-quantile", "1.5",
                 "--out", tmp_path / "gap.safetensors")  # fmt: skip
    assert result.exit_code == 2 and "Invalid value for '--drop-quantile'" in result.output
    assert not (tmp_path / "gap.safetensors").exists()


def test_cli_choices_match_the_library():
    options = {p.name: p for p in fit_gap_command.params}
    assert tuple(options["setting"].type.choices) == SETTINGS
    assert tuple(options["kind"].type.choices) == GAP_KINDS


def test_fit_gap_reads_a_config_file_and_set_overrides_it(stores, tmp_path):
    """Each key comes from the first of --set, a flag given, the file's gap section, the default."""
    config = tmp_path / "gap.yaml"
    config.write_text("gap:\n  setting: few-pairs\n  kind: diagonal\n  noise_scale: 0.5\n  seed: 3\n"
                      "eval:\n  beams: 2\n")  # fmt: skip
    common = ("--texts", stores / "texts", "--images", stores / "images", "--config", config)
    out = tmp_path / "file.safetensors"
    result = run("fit-gap", *common, "--out", out)
    assert result.exit_code == 0, result.output
    gap = Gap.load(out)
    assert (gap.kind, gap.info["setting"], gap.info["report"]["noise_scale"]) == (
        "diagonal",
        "few-pairs",
        0.5,
    )
    out = tmp_path / "set.safetensors"
    result = run("fit-gap", *common, "--kind", "gaussian", "--noise-scale", 0.25, "--set", "gap.kind=rotated",
                 "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    gap = Gap.load(out)
    assert (gap.kind, gap.info["report"]["noise_scale"]) == ("rotated", 0.25)
    assert "rotation seed     3" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "eval.beams=3"), "--set 'eval.beams=3': tipcap fit-gap sets 'gap.' keys only."),
        (("--set", "kind=rotated"), "--set 'kind=rotated': tipcap fit-gap sets 'gap.' keys only."),
        (("--setting", "few-pairs", "--set", "gap.knd=rotated"), "config key 'gap.knd' is unknown."),
        (
            ("--set", "gap.sigma2=-1", "--set", "gap.setting=text-only"),
            "config key 'gap.sigma2': input should be",
        ),
        (
            ("--config", "{config}"),
            "unknown section 'gpa'; the sections are embed, gap, model, data, train, eval.",
        ),
        ((), "--setting is required (or gap.setting in --config or --set)."),
    ],
)
def test_fit_gap_config_mistakes_are_one_line(tmp_path, args, message):
    config = tmp_path / "gap.yaml"
    config.write_text("gpa:\n  setting: few-pairs\n")
    args = [str(a).format(config=config) for a in args]
    result = run("fit-gap", "--texts", tmp_path / "texts", "--out", tmp_path / "gap.safetensors", *args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
