"""Shared fixtures: phantom cases are deterministic, so each is made once per test session."""

from __future__ import annotations

import pytest
from SegRapSegmenterLib.phantom import cases as phantom


@pytest.fixture(scope="session")
def small_case() -> phantom.PhantomCase:
    """Phantom case 0 of cohort 0, small size, identity direction."""
    return phantom.make_case(0, seed=0, size="small")


@pytest.fixture(scope="session")
def small_cases() -> list[phantom.PhantomCase]:
    """Three small phantom cases of cohort 7 (different anatomy variations and tumours)."""
    return [phantom.make_case(i, seed=7, size="small") for i in range(3)]


@pytest.fixture(scope="session")
def written_case(tmp_path_factory) -> phantom.CasePaths:
    """A small phantom case written in the release layout."""
    root = tmp_path_factory.mktemp("phantom_release")
    return phantom.write_case(phantom.make_case(1, seed=3, size="small"), root)
