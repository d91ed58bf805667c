"""Writes that are never visible half-done: write to a temporary name beside the target, then rename."""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


def temporary_path(target: str | Path) -> Path:
    """A fresh temporary name beside ``target`` (a file or a folder), removable by ``remove_stale_temporaries``.

    A random suffix, not the pid: writers on several hosts sharing one dataset root have colliding pids.
    """
    target = Path(target)
    return target.with_name(f"{TMP_PREFIX}{target.name}.{uuid.uuid4().hex}")


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    On any exception the temporary file is removed and ``target`` is left as it was. If the body
    deletes the temporary file, nothing is renamed (the target is kept as it is).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    try:
        yield tmp
        if tmp.exists():
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | Path, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def write_parquet_atomic(target: str | Path, table: pa.Table | pd.DataFrame, schema: pa.Schema | None = None) -> bool:
    """Write a Parquet file byte-for-byte reproducibly (no pandas index, fixed writer options).

    Returns False, leaving the file and its mtime untouched, when ``target`` already holds exactly these
    bytes: a stage can then tell that its input did not change.
    """
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, schema=schema, preserve_index=False)
    elif schema is not None:
        table = table.cast(schema)
    table = table.replace_schema_metadata(None)
    target = Path(target)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=True, store_schema=False)
        if target.exists() and filecmp.cmp(tmp, target, shallow=False):
            tmp.unlink()
            return False
    return True


def remove_stale_temporaries(folder: str | Path, recursive: bool = True) -> int:
    """Delete the temporary files and folders a killed run left under ``folder`` (in it only, unless
    ``recursive``); returns how many were removed.

    Only safe while no other writer works under ``folder``: their temporaries look the same.
    """
    folder = Path(folder)
    if not folder.exists():
        return 0
    removed = 0
    # Sorted, so a temporary folder goes before anything inside it (which then no longer exists).
    for path in sorted((folder.rglob if recursive else folder.glob)(TMP_PREFIX + "*")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
        else:
            continue
        removed += 1
    return removed
