"""Typed job configs filled from TOML files under ``jobs/``.

Every job has a dataclass of settings. A TOML file fills it; any key the
dataclass does not declare is an error that names the key, so a typo never
silently falls back to a default::

    cfg = load_config(EmbedConfig, "jobs/embed.toml", overrides={"limit": 100})
    fingerprint(cfg)  # stable hash of every setting, stored in table metadata

The project's own files (``jobs/*.toml``, DeepSpeed JSONs, ``jobs/profiles/``)
are found through :func:`jobs_dir`, next to the installed ``img`` package, never
through the working directory: running ``img`` inside an untrusted folder
cannot change which settings or weights are used::

    jobs_dir()                                    # <project>/jobs
    project_file("train.toml")                    # <project>/jobs/train.toml, or None if missing
    resolve_project_path("jobs/deepspeed_zero0.json")   # relative -> <project>/..., absolute as is
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from img.errors import UserError

T = TypeVar("T")

PROJECT_DIR = Path(__file__).resolve().parents[1]  # the folder holding img/, pipelines/ and jobs/


def jobs_dir() -> Path:
    """The installed project's ``jobs/`` folder (the only place default job files are read from)."""
    return PROJECT_DIR / "jobs"


def project_file(name: str) -> Path | None:
    """``jobs/<name>`` of the installed project when it exists, else None (settings then come from defaults)."""
    path = jobs_dir() / name
    return path if path.is_file() else None


def resolve_project_path(value: str | Path) -> Path:
    """A path named in a job setting: absolute as given (``~`` expanded), relative to the project otherwise."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else PROJECT_DIR / p


def _check_type(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(arg, value, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"config key '{key}' has an invalid value {value!r}.")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise UserError(f"config key '{key}' = {value!r} is not one of {list(allowed)}. Use one of those values.")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' = {value!r} must be a list.")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_check_type(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' = {value!r} must be a table.")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a table [{key}], got {value!r}.")
        return from_dict(tp, value, where=f"{key}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{key}' = {value!r} must be a number.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key '{key}' = {value!r} must be an integer.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}' = {value!r} must be true or false.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"config key '{key}' = {value!r} must be a string.")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``UserError`` naming the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(
            f"unknown config key '{where}{unknown[0]}' for {cls.__name__}. "
            f"Known keys: {', '.join(sorted(fields))}."
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _check_type(hints[name], value, f"{where}{name}")
    return cls(**kwargs)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The table in TOML file ``path``; ``UserError`` naming the file when it is missing or not TOML."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist. Pass an existing TOML file as `config` (e.g. one under jobs/).")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {str(p)!r} is not valid TOML: {e}. Fix the file.") from None


def load_config(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None = None) -> T:
    """Read TOML ``path`` (or only defaults when None) into ``cls``, then apply non-None overrides."""
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def fingerprint(cfg: Any, exclude: tuple[str, ...] = ()) -> str:
    """A short stable hash of the config's settings, minus ``exclude`` (e.g. run-size knobs)."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in exclude}
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
