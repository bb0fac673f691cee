"""Shared test fixtures: the repository root and the model bundle the tests run with."""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # app.py, operators/ and brainmirror/ live at the repository root
    sys.path.insert(0, str(REPO))
SHIPPED_MODELS = REPO / "models"


def shipped_weights() -> bool:
    """Whether the trained bundle is in ``models/brainmirror``."""
    return (SHIPPED_MODELS / "brainmirror" / "configs" / "metadata.json").is_file()


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The app's models folder with the shipped, calibrated weights."""
    if not shipped_weights():
        pytest.fail("no model bundle in models/brainmirror: see the README's training command")
    return SHIPPED_MODELS


def terminate(process: subprocess.Popen, timeout: float) -> None:
    """Stop a process this test run started, by its PID: SIGTERM, then SIGKILL after ``timeout`` s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stack_limit(mib: int) -> Callable[[], None]:
    """A ``preexec_fn`` that gives the child a soft stack limit of ``mib`` MiB (as ``ulimit -s``),
    where the hard limit allows it."""
    def apply() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_STACK)
        if hard == resource.RLIM_INFINITY or hard >= mib * 2**20:
            resource.setrlimit(resource.RLIMIT_STACK, (mib * 2**20, hard))

    return apply
