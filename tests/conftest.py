"""Shared fixtures: paths to the committed sample data and to the real scans in ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"
REAL_DATA = REPO.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The committed synthetic sample set (sample_data/)."""
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def real_data() -> Path:
    """../shared/data/real; tests using it skip when it is absent (a user's fresh clone)."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not present at {REAL_DATA}")
    return REAL_DATA
