"""One exception type for problems the user can fix.

The CLI turns a `CcdsError` into a single line on stderr and exit code 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class CcdsError(Exception):
    """Bad input or configuration: the message says what, where, and what to do."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [f"{where}: {what}" if where else what]
        if fix:
            parts.append(fix)
        super().__init__(" — ".join(parts))


def require(module: str, extra: str, what: str) -> ModuleType:
    """`module`, imported where an optional part is used. Missing, it is a CcdsError naming
    the ccds extra that installs it: a missing extra is the user's to fix, not a traceback."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise CcdsError(f"{what} needs {e.name or module}, which is not installed", None,
                        f"pip install 'ccds[{extra}]'") from None
