"""Unit tests run without a broker and without the caller's STREAMER_* environment."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _no_streamer_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STREAMER_"):
            monkeypatch.delenv(name)
