"""Pinned CPU arithmetic (tipcap.portable): one workload gives the same bytes under another processor's
kernel choices when pinned, and other bytes when not. The "other processor" is this one told to take the
code paths of an AVX2 machine with one core (ATen's capability, MKL's and glibc's dispatch, the thread
count), which is how the demo's digits moved between an AMD EPYC and an Intel Xeon."""

import os
import subprocess
import sys

import pytest

from tipcap.portable import PINS, THREADS

# A toy world, its CLIP trained a few steps, and the bytes of both: what the demo's first stages make.
WORKLOAD = """
import hashlib, sys
from pathlib import Path
from tipcap.portable import pin_cpu_arithmetic
if sys.argv[2] == "pinned":
    assert pin_cpu_arithmetic() is None
from tipcap.toy import clip, world2, world2_grammar
from tipcap.demo import demo_scale
out = Path(sys.argv[1])
world2.write_world(out / "world", seed=0, train=96, val=16, test=4, progress=False)
scale = demo_scale(True, 2)
clip.train_toyclip(out / "world" / "toyworld.json", out / "clip", steps=6, batch_size=16, seed=0,
                   config=scale.clip_config, gap=scale.gap, scale_warmup=2,
                   negatives=world2_grammar.perturb, seeing_steps=6, scene_supervision=1.0, progress=False)
print(hashlib.sha256((out / "clip" / "toyclip.safetensors").read_bytes()).hexdigest())
"""
OTHER_PROCESSOR = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX512DQ,-AVX512BW,-AVX512VL,-AVX512CD",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _digest(tmp_path, name: str, mode: str, extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in PINS}
    env.update({"HF_HUB_OFFLINE": "1", **extra})
    done = subprocess.run([sys.executable, "-c", WORKLOAD, str(tmp_path / name), mode], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


@pytest.mark.slow
def test_pinned_arithmetic_gives_the_same_bytes_under_another_processor_s_kernels(tmp_path):
    pinned_here = _digest(tmp_path, "pinned-here", "pinned", {})
    pinned_there = _digest(tmp_path, "pinned-there", "pinned", OTHER_PROCESSOR)
    native_here = _digest(tmp_path, "native-here", "native", {})
    native_there = _digest(tmp_path, "native-there", "native", OTHER_PROCESSOR)
    # Without the pins the emulated processor trains other weights: the test can see a difference.
    assert native_here != native_there
    assert pinned_here == pinned_there


def test_pins_are_refused_once_torch_is_loaded_and_checked_in_a_fresh_process():
    """In this test process torch is loaded, so pinning says why it cannot; a fresh interpreter that pins
    first runs on ATen's baseline kernels with THREADS threads, whatever the parent's environment said."""
    import torch  # noqa: F401  (loaded, as in every in-process command-line test)

    from tipcap.portable import pin_cpu_arithmetic

    before = dict(os.environ)
    assert "torch" in pin_cpu_arithmetic() and dict(os.environ) == before
    code = (
        "from tipcap.portable import pin_cpu_arithmetic, pinned; assert pin_cpu_arithmetic() is None; "
        "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), pinned())"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["DEFAULT", str(THREADS), "True"]
