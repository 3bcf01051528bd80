"""Reading the JSONL files users hand us (prompts for generate, datasets for training).

Every problem is reported as one line that names the file and line number.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ElasticDecodeError, InvalidRequestError


def read_jsonl(path: str | Path, label: str) -> list[tuple[str, dict]]:
    """`(where, row)` for every non-blank line; `where` is "PATH line N" for error messages."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ElasticDecodeError(f"cannot read {label} {path}: {e.strerror}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ElasticDecodeError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ElasticDecodeError(f"{where}: each line must be a JSON object")
        rows.append((where, row))
    return rows


def check_conversation(messages, where: str | None = None) -> None:
    """A conversation: a non-empty list of {"role", "content"} objects whose contents are not blank (the one
    check of the APIs, the CLIs and the trainer's data files)."""
    prefix = f"{where}: " if where else ""
    if not (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
        raise InvalidRequestError(f'{prefix}a conversation must be a non-empty list of {{"role", "content"}} objects',
                                  param="messages")
    if any(not str(m["content"]).strip() for m in messages):
        raise InvalidRequestError(f"{prefix}a conversation has an empty message", param="messages")


def check_messages(row: dict, where: str) -> None:
    """A row's "messages", when present, is a conversation (check_conversation)."""
    if "messages" in row:
        check_conversation(row["messages"], where)
