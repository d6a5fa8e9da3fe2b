"""Warnings that point at the user's line.

Why: a fallback warning raised deep in a backend (or during ``loss.backward()``) with a fixed
``stacklevel`` names a line of attncc or of torch, which tells a user nothing about which call
of theirs it concerns. Python 3.12's ``skip_file_prefixes`` does this; 3.11 does not have it.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

import attncc

_SKIPPED = tuple(os.path.dirname(m.__file__) + os.sep for m in (attncc, torch))


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the innermost frame outside attncc and torch (at this function's caller
    when every frame is inside them)."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: this function's caller
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)
