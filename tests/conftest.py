"""Fixtures shared by the black-box tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Sink


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    """A recording `engine sink` of this test's own; a module that needs another kind defines its own."""
    sink = Sink(tmp_path / "sink")
    yield sink
    sink.stop()
