"""The monitor's log on disk: one JSON object per line, one line per sampled step.

Each line is ``{"step": int, "time": float, "kurtosis_threshold": float,
"saturation_threshold": float, "metrics": {"fp8/<layer>/kurtosis": ..., ...}}`` with every
layer's metrics (whatever the Trainer logs). Non-finite values are written as ``NaN`` /
``Infinity``, which Python's :mod:`json` reads back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["LOG_NAME", "append_record", "drop_records_after", "find_log", "read_records"]

LOG_NAME = "fp8_monitor.jsonl"


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of one log file, in file order (a line cut short by a crash is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def drop_records_after(path: str | os.PathLike, step: int) -> int:
    """Remove the records of steps after ``step`` (a run resumed from the checkpoint at ``step``
    repeats them: the log then holds the steps of the run that goes on, once each). Returns how
    many were dropped; a missing file drops nothing."""
    path = Path(path)
    if not path.is_file():
        return 0
    records = read_records(path)
    kept = [r for r in records if not (isinstance(r.get("step"), int) and r["step"] > step)]
    if len(kept) != len(records):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return len(records) - len(kept)


def find_log(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file; else ``path/fp8_monitor.jsonl``; else the newest such file below ``path``."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    direct = path / LOG_NAME
    if direct.is_file():
        return direct
    found = sorted(path.rglob(LOG_NAME), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"{path}: no {LOG_NAME} in it or below it; the FP8 monitor writes one when it is given a log "
            "directory (Fp8Monitor(log_dir=...), or the Trainer's output_dir with --fp8_monitor_interval)"
        )
    return found[-1]
