"""Settings files: one YAML mapping, read with one plain line for whatever is wrong with it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` ({} for an empty file). A file that cannot be read, is
    not text, is not valid YAML or holds something other than a mapping (``what``, e.g. "a profile
    config") is a UsageError naming the file and, for a syntax error, the line and column."""
    p = Path(path)
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise UsageError(f"{p}: not a text file; {what} is a YAML file") from None
    except OSError as e:
        raise UsageError(f"{p}: cannot be read ({(e.strerror or str(e)).lower()})") from None
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{p}: not valid YAML{where} ({problem}); {what} is a YAML mapping") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise UsageError(f"{p}: holds a {type(d).__name__}, not the mapping of settings that {what} is")
    return d


def named_config(text: str | Path, folder: Path, what: str) -> Path:
    """A settings file given as a path, or by name (``imagenet-lite``) from ``folder``, the configs
    that ship with the package, so a documented command works from any folder."""
    p = Path(text)
    if p.is_file() or "/" in str(text) or p.suffix:
        return p
    named = folder / f"{text}.yaml"
    if named.is_file():
        return named
    known = sorted(f.stem for f in folder.glob("*.yaml")) if folder.is_dir() else []
    raise UsageError(f"{text}: no such file, and no {what} of that name; the packaged ones: {', '.join(known) or 'none'}")


__all__ = ["read_mapping", "named_config"]
