"""Typed settings from YAML files and command-line values: one function, used by the CLI and
by `sweep.load_config`, so that a bad setting reads the same wherever it comes from."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from .errors import CcdsError

M = TypeVar("M", bound=BaseModel)


def load_config(model_cls: type[M], path: Path | None = None,
                overrides: dict[str, Any] | None = None) -> M:
    """`model_cls` from an optional YAML file, with `overrides` (None values ignored) on top.
    A malformed file or a bad setting is a CcdsError naming the file, line and setting."""
    import yaml
    from pydantic import ValidationError

    base: dict[str, Any] = {}
    if path is not None:
        from .io import read_text

        try:
            base = yaml.safe_load(read_text(path)) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise CcdsError(f"malformed YAML ({getattr(e, 'problem', e)})", where) from None
        if not isinstance(base, dict):
            raise CcdsError("expected a mapping of settings", str(path))
    base.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return model_cls(**base)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(map(str, err["loc"])) or "config"
        raise CcdsError(f"bad setting '{loc}': {err['msg']}", str(path) if path else None,
                        f"see `ccds ... --help` for valid {model_cls.__name__} settings") from None


def parse_params(items: list[str] | None, flag: str = "--param") -> dict[str, Any]:
    """`name=value` strings (values read as YAML: 3, 0.5, true, [a, b]) as a dict."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CcdsError(f"bad {flag} {item!r}", None, f"use {flag} name=value")
        out[key.strip()] = yaml.safe_load(value)
    return out
