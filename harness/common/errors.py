"""User errors: what the user asked for is wrong. Reported as one line naming the problem, never a traceback, by
the benchmark and the server alike."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


class UserError(ValueError):
    """A problem with what the user asked for: reported as one line, never a traceback."""


def describe_error(e: BaseException) -> str:
    """One line naming the problem: the missing option and the choices, or the unknown key and the valid ones."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        if e.options:
            return f"unknown {group or 'config'} {option!r}; choose one of: {', '.join(sorted(e.options))}"
        return f"could not find config {e.missing_cfg_file!r}"
    user = user_error_in(e)
    if user is not None:  # raised inside a resolver or a composition: its own message is the line
        return str(user)
    cause = e.__cause__ if isinstance(e, ConfigCompositionException) and e.__cause__ is not None else e
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and " not in " in str(cause):
        override = re.search(r"Could not override '([^']+)'", str(e))
        key = getattr(cause, "full_key", None) or (override.group(1) if override else str(cause.key))
        keys = _valid_keys(cause.object_type)
        return f"unknown key {key!r}" + (f"; valid keys here: {', '.join(keys)}" if keys else "")
    if isinstance(cause, OmegaConfBaseException):
        first = str(cause).strip().splitlines()[0]
        key = getattr(cause, "full_key", None)
        return f"{key}: {first}" if key and key not in first else first
    return " ".join(str(e).split()) or type(e).__name__


def user_error_in(e: BaseException) -> UserError | None:
    """The UserError that ``e`` is or was raised from (a resolver's error arrives wrapped by OmegaConf)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _valid_keys(object_type: Any) -> list[str]:
    if isinstance(object_type, type) and dataclasses.is_dataclass(object_type):
        return sorted(f.name for f in dataclasses.fields(object_type))
    return []


def _user_errors() -> tuple[type[BaseException], ...]:
    from engines.model.config import ModelLoadError
    from engines.request import RequestError

    return (UserError, RequestError, ModelLoadError, ConfigCompositionException, OmegaConfBaseException)


USER_ERRORS = _user_errors()
