"""The isolated Python environment benchmarks run in: lmms-eval beside its own torch.

lmms-eval cannot share the training venv: it pins packages the training stack also uses (e.g.
``wandb``) and needs torchvision, and PyPI's torchvision does not load beside the CPU torch
build of the training venv (``operator torchvision::nms does not exist``). So ``vwlmm-eval``
does its own work (finding the checkpoint, exporting it, writing metrics) in the training venv
and runs lmms-eval with this environment's python, in a subprocess (``pipeline/lmms_runner.py``);
the two sides meet only through files: an HF llava folder in, lmms-eval's results out.

The environment is a venv under ``build/eval-env`` (``VWLMM_EVAL_ENV`` names another folder)
holding ``PINS`` (``eval_requirements.txt``). It is created by ``make eval-env``
(``python -m pipeline.eval_env``), and is complete when its stamp file records exactly these pins: a killed install, or one made for other
pins, is refused by ``eval_python`` and completed by the next install (pip installs what the
pins still need into the existing venv).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from vwlmm_data.errors import Refusal

REPO = Path(__file__).resolve().parents[1]
ENV_VARIABLE = "VWLMM_EVAL_ENV"
DEFAULT_ENV = REPO / "build" / "eval-env"
REQUIREMENTS = Path(__file__).with_name("eval_requirements.txt")


def read_pins(path: Path = REQUIREMENTS) -> Tuple[str, ...]:
    """The requirement lines of ``eval_requirements.txt``."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return tuple(line for line in lines if line)


PINS = read_pins()
STAMP = ".vwlmm-eval-env"
INSTALL_HINT = "make eval-env (python -m pipeline.eval_env)"


class EvalEnvMissing(Refusal):
    """The isolated lmms-eval environment is absent, incomplete or made for other pins."""


def env_dir() -> Path:
    return Path(os.environ.get(ENV_VARIABLE) or DEFAULT_ENV)


def _stamp_text() -> str:
    return "\n".join(PINS) + "\n"


def _python_of(folder: Path) -> Path:
    return folder / "bin" / "python"


def is_complete(folder: Path) -> bool:
    stamp = folder / STAMP
    return _python_of(folder).is_file() and stamp.is_file() and stamp.read_text() == _stamp_text()


def eval_python(folder: Optional[Path] = None) -> Path:
    """The python of the complete isolated environment; EvalEnvMissing (one line, saying how to
    create it) otherwise."""
    folder = Path(folder) if folder is not None else env_dir()
    if not is_complete(folder):
        state = "is made for other versions" if (folder / STAMP).is_file() else "is missing"
        raise EvalEnvMissing(
            f"lmms-eval's environment {folder} {state}: run `{INSTALL_HINT}`, which installs "
            f"{' '.join(PINS)} into a venv of its own (lmms-eval and torchvision cannot be "
            "installed into the training venv)")
    return _python_of(folder)


def install(folder: Optional[Path] = None, python: str = sys.executable) -> Path:
    """Create the environment (nothing to do when it is complete); returns its python.

    ``pip`` takes its indexes, find-links and constraints from the machine's pip
    configuration, as every other install of the project does.
    """
    folder = Path(folder) if folder is not None else env_dir()
    if is_complete(folder):
        os.utime(folder / STAMP)  # newer than its recipe: `make eval-env` has nothing to do
        print(f"vwlmm eval-env: {folder} is complete ({' '.join(PINS)})", flush=True)
        return _python_of(folder)
    start = time.monotonic()
    print(f"vwlmm eval-env: installing into {folder}: {' '.join(PINS)} (a few GB; minutes)",
          flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    (folder / STAMP).unlink(missing_ok=True)
    if not _python_of(folder).is_file():
        subprocess.run([python, "-m", "venv", "--clear", str(folder)], check=True)
    subprocess.run([str(_python_of(folder)), "-m", "pip", "install", "-q", "--progress-bar",
                    "off", *PINS], check=True)
    # The stamp goes last: its presence means every pin above is installed.
    (folder / STAMP).write_text(_stamp_text())
    print(f"vwlmm eval-env: ready in {time.monotonic() - start:.0f} s: {_python_of(folder)}",
          flush=True)
    return _python_of(folder)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.eval_env",
        description="Create the isolated venv vwlmm-eval runs lmms-eval in "
                    f"({' '.join(PINS)}), at ${ENV_VARIABLE} or {DEFAULT_ENV}. Does nothing "
                    "when it is complete; completes an unfinished or outdated one.")
    parser.add_argument("--dir", type=Path, default=None,
                        help=f"where to create it (default: ${ENV_VARIABLE}, else {DEFAULT_ENV})")
    args = parser.parse_args(argv)
    try:
        install(args.dir)
    except subprocess.CalledProcessError as exc:
        print(f"vwlmm eval-env: error: `{' '.join(map(str, exc.cmd))}` exited {exc.returncode}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
