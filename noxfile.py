"""Task runner: every session installs what it needs into .venv (once), then runs.

nox -s demo     train DeepFM on the embedded demo data
nox -s tests    the test suite (what .ci/run runs)
nox -s dev      just create .venv with the project in editable mode
nox -s bench    throughput benchmark against a plain PyTorch baseline
nox -s quality  test AUC per epoch of every ranking model against a hand-written floor
nox -s lint     ruff
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
ROOT = Path(__file__).parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".recsys-installed"
TORCH = "torch==2.13.0"
TORCHREC = "torchrec==1.8.0"
# torchrec 1.8's metadata requires the CUDA-only `fbgemm-gpu`; it is installed with --no-deps
# next to the FBGEMM 1.8.0 build that fits the machine (1.7/1.9 fail to load with torch 2.13).
FBGEMM_CPU = "fbgemm-gpu-cpu==1.8.0"
FBGEMM_CUDA = "fbgemm-gpu==1.8.0"


def _fbgemm() -> str:
    return FBGEMM_CUDA if shutil.which("nvidia-smi") else FBGEMM_CPU


def install(session: nox.Session) -> None:
    """Create .venv and install the pinned stack plus this project (editable); skip if current."""
    spec = "\n".join([TORCH, _fbgemm(), TORCHREC, (ROOT / "pyproject.toml").read_text()])
    digest = hashlib.sha256(spec.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    if not PYTHON.exists():
        session.run(sys.executable, "-m", "venv", str(VENV), external=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    session.run(*pip, TORCH, _fbgemm(), external=True)
    session.run(*pip, "--no-deps", TORCHREC, external=True)
    session.run(*pip, "-e", ".[dev]", external=True)
    STAMP.write_text(digest)


@nox.session(venv_backend="none")
def dev(session: nox.Session) -> None:
    """Create .venv for development: `source .venv/bin/activate`."""
    install(session)
    session.log("ready: source .venv/bin/activate && python -m recsys.train --help")


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """Train DeepFM on the demo data (generated once into ~/.cache/recsys)."""
    install(session)
    session.run(str(PYTHON), "-m", "recsys.train", *session.posargs, external=True)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The test suite; pass pytest arguments after --."""
    install(session)
    session.run(str(PYTHON), "-m", "pytest", *session.posargs, external=True)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Training vs the floor; reader vs an Arrow scan; a 2-source mix; checkpoints; 1 vs 2 ranks."""
    install(session)
    session.run(str(PYTHON), "benchmarks/train_throughput.py", *session.posargs, external=True)
    session.run(str(PYTHON), "benchmarks/reader_throughput.py", external=True)
    session.run(str(PYTHON), "benchmarks/mix_throughput.py", external=True)
    session.run(str(PYTHON), "benchmarks/checkpoint_io.py", external=True)
    session.run(str(PYTHON), "benchmarks/distributed_throughput.py", external=True)


@nox.session(venv_backend="none")
def quality(session: nox.Session) -> None:
    """Every ranking model vs a hand-written floor on generated sets of several effect mixes."""
    install(session)
    session.run(str(PYTHON), "benchmarks/quality.py", *session.posargs, external=True)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    install(session)
    session.run(str(PYTHON), "-m", "ruff", "check", ".", external=True)
    session.run(str(PYTHON), "-m", "ruff", "format", "--check", ".", external=True)
