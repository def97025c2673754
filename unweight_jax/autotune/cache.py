"""The persistent cache of tuned choices: one JSON file shared by every process of a user.

Location: the `path` argument, else $UNWEIGHT_AUTOTUNE_CACHE, else
`$XDG_CACHE_HOME/unweight_jax/autotune-v1.json` (`~/.cache/...` without XDG_CACHE_HOME).

A write takes an exclusive `fcntl.flock` on a sidecar `<file>.lock`, re-reads the file, merges
its entry in and renames a complete, fsynced temporary file into place, so readers (who take no
lock) see the old file or the new one, and two processes tuning at once lose no entry. A file
that is not valid JSON of this schema and version is renamed aside to `<file>.corrupt-<time>`,
with a warning naming it, and the cache starts again empty. Each process reads the file once and
then answers from memory; it re-reads it before measuring a case it does not know, in case
another process tuned that case meanwhile.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..bundle import _create_temporary, _fsync_directory

SCHEMA = "unweight_jax.autotune"
VERSION = 1
CACHE_ENV = "UNWEIGHT_AUTOTUNE_CACHE"

Entry = dict[str, Any]


def default_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unweight_jax" / f"autotune-v{VERSION}.json"


def resolve(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache file: `path`, else $UNWEIGHT_AUTOTUNE_CACHE, else the default."""
    chosen = path or os.environ.get(CACHE_ENV) or default_path()
    return Path(chosen).expanduser().absolute()


class PlanCache:
    """The entries of one cache file, key text -> entry (plan, times of every candidate, date)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, Entry] | None = None  # None: not read yet
        self._mutex = threading.Lock()

    def get(self, key: str) -> Entry | None:
        with self._mutex:
            if self._entries is None:
                self._entries = self._read()
            return self._entries.get(key)

    def refresh(self) -> None:
        """Re-read the file: another process may have written since."""
        with self._mutex:
            self._entries = self._read()

    def entries(self) -> dict[str, Entry]:
        with self._mutex:
            if self._entries is None:
                self._entries = self._read()
            return dict(self._entries)

    def put(self, key: str, entry: Entry) -> None:
        """Add or replace one entry, merged into the file as it is now."""
        with self._mutex, self._locked():
            entries = self._read(locked=True) | {key: entry}
            self._write(entries)
            self._entries = entries

    def _read(self, *, locked: bool = False) -> dict[str, Entry]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        problem = _problem(text)
        if problem is None:
            return json.loads(text)["entries"]
        if not locked:  # set it aside under the lock, unless a writer replaced it meanwhile
            with self._locked():
                return self._read(locked=True)
        aside = self.path.with_name(f"{self.path.name}.corrupt-{_now().strftime('%Y%m%dT%H%M%S.%fZ')}")
        os.replace(self.path, aside)
        warnings.warn(f"autotune cache {self.path}: {problem}; moved to {aside}, starting a new one", stacklevel=4)
        return {}

    def _write(self, entries: dict[str, Entry]) -> None:
        fd, tmp = _create_temporary(self.path)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump({"schema": SCHEMA, "version": VERSION, "entries": entries}, out, indent=1, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_directory(self.path.parent)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


_OPEN: dict[Path, PlanCache] = {}
_OPEN_MUTEX = threading.Lock()


def open_cache(path: str | os.PathLike[str] | None = None) -> PlanCache:
    """The process's one PlanCache for the resolved path (its memory is shared by every caller)."""
    resolved = resolve(path)
    with _OPEN_MUTEX:
        if resolved not in _OPEN:
            _OPEN[resolved] = PlanCache(resolved)
        return _OPEN[resolved]


def forget_open() -> None:
    """Drop every PlanCache's memory (the files stay): the next lookup reads its file again."""
    with _OPEN_MUTEX:
        _OPEN.clear()


def now_text() -> str:
    return _now().isoformat(timespec="seconds")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _problem(text: str) -> str | None:
    """Why `text` is not a cache file of this schema and version, or None."""
    try:
        data = json.loads(text)
    except ValueError as e:
        return f"not valid JSON ({e})"
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return f"not an unweight_jax autotune cache (schema {SCHEMA!r} expected)"
    if data.get("version") != VERSION:
        return f"cache version {data.get('version')!r}, this library reads version {VERSION}"
    if not isinstance(data.get("entries"), dict):
        return "no 'entries' object"
    return None
