"""Shared test fixtures: the repository root and the model bundle the tests run with."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # app.py, operators/ and brainmirror/ live at the repository root
    sys.path.insert(0, str(REPO))
SHIPPED_MODELS = REPO / "models"
# Until the shipped weights exist, a small calibrated bundle (verdicts meaningless, pipeline real).
FALLBACK_MODELS = Path(os.environ.get("BRAINMIRROR_TEST_MODELS", "/tmp/m1"))


def shipped_weights() -> bool:
    """Whether the trained bundle is in ``models/brainmirror``."""
    return (SHIPPED_MODELS / "brainmirror" / "configs" / "metadata.json").is_file()


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The app's models folder: ``models/`` with the shipped weights, else the test bundle."""
    if shipped_weights():
        return SHIPPED_MODELS
    if (FALLBACK_MODELS / "configs" / "metadata.json").is_file() or (
        FALLBACK_MODELS / "brainmirror" / "configs" / "metadata.json"
    ).is_file():
        return FALLBACK_MODELS
    pytest.skip("no model bundle: train into models/brainmirror or set BRAINMIRROR_TEST_MODELS")
