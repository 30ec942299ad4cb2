"""Compiled code shared by every process that loads the same release.

A release is immutable, so what compiling it produces (Python code objects,
Jinja template code) is the same in every worker and on every rollback to
it. Compiling is most of a swap's CPU time; under the GIL it is time the
worker's other threads cannot serve. :class:`CodeCache` keeps both kinds
under ``<data_dir>/cache/``, keyed by the content and path they came from
and the interpreter's bytecode magic, so a stale entry can never be used.
Writes are atomic (temp file + rename); any cache failure just compiles.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import marshal
import os
import tempfile
import types
from pathlib import Path

import jinja2

__all__ = ["CodeCache"]

logger = logging.getLogger(__name__)


class CodeCache:
    """Python and Jinja code caches under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._python = self.root / "python"
        self._jinja: jinja2.BytecodeCache | None = None

    def compile(self, source: bytes, filename: str) -> types.CodeType:
        """``compile(source, filename, "exec")``, from the cache when possible.

        Raises SyntaxError exactly like ``compile`` (errors are not cached).
        """
        key = hashlib.sha256(
            importlib.util.MAGIC_NUMBER + filename.encode() + b"\0" + source
        ).hexdigest()
        path = self._python / key[:2] / key
        try:
            return marshal.loads(path.read_bytes())  # type: ignore[no-any-return]
        except (OSError, ValueError, EOFError, TypeError):
            pass
        code = compile(source, filename, "exec", dont_inherit=True)
        self._store(path, marshal.dumps(code))
        return code

    def jinja(self) -> jinja2.BytecodeCache | None:
        """A Jinja bytecode cache in this directory (keyed by name, file and source)."""
        if self._jinja is None:
            directory = self.root / "jinja"
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                logger.warning("template cache %s unavailable: %s", directory, exc)
                return None
            self._jinja = jinja2.FileSystemBytecodeCache(str(directory))
        return self._jinja

    @staticmethod
    def _store(path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            logger.debug("code cache: could not write %s: %s", path, exc)
