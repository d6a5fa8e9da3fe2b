"""Shared test set-up: every test starts from the same torch random state, so failures reproduce."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
