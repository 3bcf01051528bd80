"""Checks on the files and folders the CLIs write, made before any model loads.

A run that fails only when it writes its results (a folder given as a file, a read-only path, a
parent that is a file) loses all its work; these checks turn that into one error line up front.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ElasticDecodeError


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_output_file(path: Path, flag: str) -> None:
    """`path` can be created or overwritten as a file."""
    if path.is_dir():
        raise ElasticDecodeError(f"{flag} {path} is a folder; give a file path")
    parent = path.parent
    base = _nearest_existing(parent)
    if not base.is_dir():
        raise ElasticDecodeError(f"{flag} {path}: {base} is a file, not a folder")
    if base != parent:
        raise ElasticDecodeError(f"{flag} folder {parent} does not exist")
    if (path.exists() and not os.access(path, os.W_OK)) or not os.access(parent, os.W_OK | os.X_OK):
        raise ElasticDecodeError(f"{flag} {path} is not writable")


def check_output_dir(path: Path, flag: str) -> None:
    """`path` is a writable folder or can be created as one."""
    if path.exists() and not path.is_dir():
        raise ElasticDecodeError(f"{flag} {path} is a file; give a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ElasticDecodeError(f"{flag} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ElasticDecodeError(f"{flag} {path} is not writable ({base} is read-only)")
