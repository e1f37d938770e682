"""The torch-free validator on an emulated Raspberry Pi: an arm64 Debian root under qemu-user.

The root is built once (tests/pi/build-root.sh, cached under EDGE_CACHE, outside the repo);
gemma-edge is installed there with `pip install .[device]` (numpy, ai-edge-litert, onnxruntime:
no torch), and `edge validate` runs a .tflite bundle there as it would on a Pi 5 (cortex-a76).
Timings under emulation mean nothing: these tests check correctness only.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edge.models.loading import cache_dir
from edge.validate.run import validate

pytestmark = pytest.mark.pi

REPO = Path(__file__).resolve().parent.parent


def in_root(root: Path, *cmd: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root", "QEMU_CPU": "cortex-a76"}
    return subprocess.run(
        [shutil.which("chroot") or "/usr/sbin/chroot", str(root), *cmd],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def pi_root() -> Path:
    """The arm64 root with gemma-edge[device] installed from this checkout."""
    if os.geteuid() != 0:
        pytest.fail("the pi tests need root (chroot, binfmt_misc): run them as root, e.g. in CI")
    root = cache_dir() / "pi-root-arm64"
    build = subprocess.run(["bash", str(REPO / "tests/pi/build-root.sh"), str(root)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    src = root / "opt/gemma-edge"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "exports", "__pycache__", "*.egg-info"))
    out = in_root(root, "/venv/bin/pip", "install", "--quiet", "/opt/gemma-edge[device]")
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def test_the_root_is_arm64_without_torch(pi_root):
    code = "import platform, importlib.util as u; print(platform.machine(), *(u.find_spec(m) is None for m in MODS))"
    out = in_root(pi_root, "/venv/bin/python", "-c", f"MODS = ('torch', 'ai_edge_litert'); {code}")
    assert out.stdout.split() == ["aarch64", "True", "False"], out.stderr


@pytest.mark.parametrize("backend", ["litert", "onnx"])
def test_validate_a_bundle_on_the_pi(pi_root, device_bundles, backend, tmp_path):
    """`edge validate` there: the lowered stage only, within the fp32 band; its dump reads back here."""
    shutil.rmtree(pi_root / "tmp/bundle", ignore_errors=True)
    shutil.copytree(device_bundles[backend]["path"], pi_root / "tmp/bundle")
    out = in_root(pi_root, "/venv/bin/edge", "validate", "/tmp/bundle", "--json", "--dump-logits", "/tmp/pi.npz")
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert list(r["stages"]) == ["lowered"] and r["verdict"]["passed"] is True
    assert r["stages"]["lowered"]["overall"]["max_abs_dlogit"] < 1e-3
    # On the host: the Pi's logits as the device stage, against the same golden file.
    dump = tmp_path / "pi.npz"
    shutil.copy(pi_root / "tmp/pi.npz", dump)
    host = validate(device_bundles[backend]["path"], stages=["lowered", "device"], device_logits=dump)
    pi, here = host["stages"]["device"]["overall"], host["stages"]["lowered"]["overall"]
    assert pi["top1"] == here["top1"] and abs(pi["mean_kld"] - here["mean_kld"]) < 1e-6


def test_a_tampered_bundle_exits_2_on_the_pi(pi_root, device_bundles):
    shutil.rmtree(pi_root / "tmp/bad", ignore_errors=True)
    shutil.copytree(device_bundles["litert"]["path"], pi_root / "tmp/bad")
    with open(pi_root / "tmp/bad/golden.npz", "ab") as f:
        f.write(b"\0")
    out = in_root(pi_root, "/venv/bin/edge", "validate", "/tmp/bad")
    assert out.returncode == 2 and "golden.npz" in out.stderr, out.stderr
