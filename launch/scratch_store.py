"""A store for one run of ``pd demo --store`` / ``pd bench ttft``: its config and its directory.

``local``: files in ``path`` (default: a fresh temporary directory, removed at the end).
``hf3fs``: through ``hf3fs_fuse.io``. With the real client, ``path`` must be on a 3FS mount.
With the USRBIO emulator (``PYTHONPATH=tests/doubles``; a test double over local files, not
3FS) the directory is made an emulated mount, and ``note`` says so.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from store.hf3fs import MISSING_MODULE


class ScratchStore:
    def __init__(self, backend: str, path: str | None = None):
        if backend not in ("local", "hf3fs"):
            raise ValueError(f"unknown store backend {backend!r}; choose local or hf3fs")
        self.backend = backend
        self._made = path is None
        self.path = Path(tempfile.mkdtemp(prefix="pdkv-store-") if path is None else path).resolve()
        self.note = ""
        try:
            if not self.path.is_dir():
                raise ValueError(f"store path {self.path} is not an existing directory")
            if backend == "hf3fs":
                self._hf3fs()
        except BaseException:
            self.cleanup()
            raise

    def _hf3fs(self) -> None:
        try:
            import hf3fs_fuse.io as io  # type: ignore[import-not-found]
        except Exception:
            raise ValueError(f"{MISSING_MODULE}; to run it on the USRBIO emulator (a test double, "
                             "not 3FS) set PYTHONPATH=tests/doubles") from None
        if getattr(io, "EMULATOR", False):
            io.emulate_mount(str(self.path))
            self.note = "store/hf3fs on the USRBIO emulator (tests/doubles): local files, not 3FS"
        elif not io.extract_mount_point(str(self.path)):
            raise ValueError(f"store path {self.path} is not on a 3FS mount")

    def config(self) -> dict:
        """The ``connector.store`` overrides."""
        if self.backend == "local":
            return {"backend": "local", "paths": [str(self.path)]}
        return {"backend": "hf3fs", "paths": [str(self.path / "kv")]}

    def cleanup(self) -> None:
        if self._made:
            shutil.rmtree(self.path, ignore_errors=True)
