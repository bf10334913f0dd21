"""``RewriterContext(cfg, backend)``: the function rewriters of ``backend`` (else ``default``)
applied inside the ``with`` block and restored on exit, also when the block raises.

Thread-safety, honestly: the patches are process-global attributes while a context is active.
So that two engines in one process never see each other's patches, a context that patches
anything holds one process-wide re-entrant lock from entry to exit: contexts in different threads
never overlap (the later one waits; two engines stepping in two threads take turns for their
forward passes, and only when rewriters are registered), while contexts nest freely in one thread.
Other threads that call a patched function meanwhile get the original (the wrapper checks the
thread), so code outside every context never runs a rewriter. A context must be left in the
thread that entered it, in the reverse order of entry (``with`` does both).

Module rewriters are applied to a model with :func:`vlm.rewrite.patch_model`, symbolic rewriters
reach the exporter through ``SYMBOLIC_REWRITER.translation_table``; neither needs the context.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

from vlm.rewrite.function import FUNCTION_REWRITER, Installed, install, uninstall
from vlm.rewrite.records import DEFAULT_BACKEND, RewriterError, check_backend

_lock = threading.RLock()
_active: list[Installed] = []  # innermost last; guarded by _lock


class RewriterContext:
    """Apply the function rewriters of ``backend`` while active; re-enterable (the engine keeps
    one and enters it around every forward step)."""

    def __init__(self, cfg: Any = None, backend: str = DEFAULT_BACKEND) -> None:
        self.cfg = cfg
        self.backend = check_backend(backend, "RewriterContext")
        self._entries: list[Installed | None] = []

    def __enter__(self) -> RewriterContext:
        plan = FUNCTION_REWRITER.plan(self.backend)
        if not plan:  # nothing to patch: no lock, no work
            self._entries.append(None)
            return self
        _lock.acquire()
        try:
            installed = install(plan, self.cfg, self.backend)
        except BaseException:
            _lock.release()
            raise
        _active.append(installed)
        self._entries.append(installed)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if not self._entries:
            raise RewriterError("RewriterContext exited more often than it was entered")
        installed = self._entries.pop()
        if installed is None:
            return
        try:
            if not _active or _active[-1] is not installed:
                raise RewriterError(
                    "rewriter contexts were left out of order (or in another thread); leave them in the reverse "
                    "order of entry, in the thread that entered them (use `with`)"
                )
            _active.pop()
            uninstall(installed)
        finally:
            _lock.release()

    def __repr__(self) -> str:
        return f"RewriterContext(backend={self.backend!r}, active={sum(e is not None for e in self._entries)})"
