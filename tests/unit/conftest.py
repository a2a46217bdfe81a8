"""Fixtures for the fast tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One torch thread: tiny models gain nothing from two, and on a busy machine two threads spinning
    at every barrier make each step up to 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
