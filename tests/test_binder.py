"""The Binder files launch the course: every runtime dependency named, pins that install together.

``binder/requirements.txt`` pins the runtime dependencies of ``pyproject.toml`` and the front
ends (JupyterLab, ipywidgets, ipympl, Voila) to versions the browser tests ran against, with
PyTorch's CPU index for a small CPU-only torch; ``binder/postBuild`` installs the package.
The last test asks pip to resolve the pins in a fresh virtual environment (metadata only,
``--dry-run``) against PyPI, without the CPU index; it skips when PyPI cannot be reached.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
import warnings
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
REQUIREMENTS = BINDER / "requirements.txt"
CPU_INDEX = "download.pytorch.org/whl/cpu"
FRONT_END = ["jupyterlab", "ipywidgets", "jupyterlab-widgets", "ipympl", "ipykernel", "voila"]

packaging_requirements = pytest.importorskip("packaging.requirements")
from packaging.requirements import Requirement  # noqa: E402
from packaging.specifiers import SpecifierSet  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402


def load_pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def binder_lines() -> list[str]:
    lines = []
    for raw in REQUIREMENTS.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def binder_pins() -> dict[str, Requirement]:
    pins = {}
    for line in binder_lines():
        if line.startswith("-"):
            continue
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in pins, f"{req.name} is listed twice in binder/requirements.txt"
        pins[name] = req
    return pins


def pinned_version(req: Requirement) -> Version:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", (
        f"binder/requirements.txt must pin {req.name} exactly (name==version), not {req}")
    return Version(specs[0].version)


def runtime_dependencies() -> list[Requirement]:
    return [Requirement(d) for d in load_pyproject()["project"]["dependencies"]]


def test_binder_names_every_runtime_dependency_at_a_version_pyproject_allows():
    pins = binder_pins()
    missing, outside = [], []
    for dep in runtime_dependencies():
        if dep.marker is not None and not dep.marker.evaluate():
            continue
        pin = pins.get(canonicalize_name(dep.name))
        if pin is None:
            missing.append(str(dep))
        elif not SpecifierSet(str(dep.specifier)).contains(pinned_version(pin), prereleases=True):
            outside.append(f"{pin} does not satisfy pyproject's {dep}")
    assert not missing, f"binder/requirements.txt lacks runtime dependencies: {missing}"
    assert not outside, outside


def test_binder_pins_the_front_end_stack_exactly():
    pins = binder_pins()
    for name in FRONT_END:
        assert canonicalize_name(name) in pins, f"binder/requirements.txt must pin {name}"
        pinned_version(pins[canonicalize_name(name)])
    # the browser tests ran against the installed front ends: say so when Binder differs
    drift = []
    for name in FRONT_END:
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue
        pinned = pinned_version(pins[canonicalize_name(name)])
        if installed != pinned:
            drift.append(f"{name}: binder {pinned}, tested here {installed}")
    if drift:
        warnings.warn("Binder pins differ from this environment: " + "; ".join(drift))


def test_cpu_torch_index_only_in_binder_requirements():
    assert any(line.startswith("--extra-index-url") and CPU_INDEX in line
               for line in binder_lines()), "binder/requirements.txt must use the CPU torch index"
    others = [ROOT / "pyproject.toml", *sorted((ROOT / ".ci").glob("*"))]
    for path in others:
        if path.is_file():
            assert CPU_INDEX not in path.read_text(errors="replace"), (
                f"{path.relative_to(ROOT)} mentions the CPU torch index; only binder/ may")


def test_binder_postbuild_installs_the_package_and_runtime_matches():
    post = BINDER / "postBuild"
    assert post.is_file() and os.access(post, os.X_OK), "binder/postBuild must be executable"
    text = post.read_text()
    assert text.startswith("#!"), "postBuild needs a shebang"
    assert re.search(r"pip install\b.*(-e\s+)?\.(\s|$)", text), "postBuild must pip install ."
    runtime = (BINDER / "runtime.txt").read_text().strip()
    m = re.fullmatch(r"python-(\d+\.\d+)", runtime)
    assert m, f"binder/runtime.txt should read python-X.Y, not {runtime!r}"
    requires = load_pyproject()["project"].get("requires-python", "")
    assert SpecifierSet(requires).contains(m.group(1) + ".0"), (runtime, requires)


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/ipympl/", timeout=10) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_binder_pins_resolve_together_in_a_fresh_venv(tmp_path):
    """pip resolves every pin (and their dependencies) for a fresh environment: no conflict.
    Only metadata is fetched (--dry-run). The CPU index is left out: this checks the pins'
    compatibility against PyPI, which also holds every pinned version of torch."""
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("\n".join(line for line in binder_lines() if not line.startswith("-")) + "\n")
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run",
           "--ignore-installed", "--quiet", "--no-input", "--disable-pip-version-check",
           "--report", str(report), "-r", str(reqs)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip("pip could not resolve within 4 minutes (slow network?)")
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and re.search(r"NewConnectionError|Max retries exceeded|"
                                          r"Temporary failure in name resolution", out):
        pytest.skip("PyPI became unreachable during resolution")
    assert proc.returncode == 0, f"the Binder pins do not install together:\n{out[-4000:]}"
    resolved = {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"])
                for i in json.loads(report.read_text())["install"]}
    for name, pin in binder_pins().items():
        assert resolved.get(name) == pinned_version(pin), (name, resolved.get(name), str(pin))
