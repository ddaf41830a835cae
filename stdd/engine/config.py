"""Config loading: shipped presets or a YAML file, plus ``key=value`` overrides.

A config is plain data (YAML, read with omegaconf). ``load_config(None)`` gives
the ``demo`` preset. A user YAML may start from a preset with ``base: <preset
or path>`` and change only what differs. Overrides use omegaconf's dot-list
syntax (``optim.lr=1e-5 data.batch_size=8``); a key that is not in the config
is an error (a typo would otherwise be silently ignored) unless it is written
``+key=value``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "demo"


class ConfigError(ValueError):
    """A config file or override is malformed; the message names it."""


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _resolve_source(config: Union[str, Path]) -> Path:
    """A path to an existing YAML file, or the name of a shipped preset."""
    path = Path(os.path.expanduser(str(config)))
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{config}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(
        f"--config {config!r}: neither a YAML file nor a shipped preset "
        f"(presets: {', '.join(list_presets()) or 'none'})"
    )


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + (path,))
        raise ConfigError(f"config 'base' chain loops: {chain}")
    try:
        cfg = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, Exception) as error:  # yaml.YAMLError is not an OmegaConf error
        raise ConfigError(f"config file {path}: cannot be read as YAML ({error})") from error
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got a list")
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    base_source = Path(os.path.expanduser(str(base)))
    if not base_source.is_absolute() and (path.parent / base_source).is_file():
        base_source = path.parent / base_source
    base_cfg = _load_yaml(_resolve_source(base_source if base_source.is_file() else base), seen + (path,))
    return OmegaConf.merge(base_cfg, cfg)


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Merge ``key=value`` strings into ``cfg``; unknown keys need a ``+`` prefix."""
    strict, additions = [], []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-5)")
        (additions if item.startswith("+") else strict).append(item.lstrip("+"))
    try:
        merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(additions))
        OmegaConf.set_struct(merged, True)
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(strict))
    except ConfigKeyError as error:
        raise ConfigError(
            f"override: {error.msg if hasattr(error, 'msg') else error} "
            f"(the key is not in the config; write +key=value to add a new key)"
        ) from error
    except OmegaConfBaseException as error:
        raise ConfigError(f"override: {error}") from error
    OmegaConf.set_struct(merged, False)
    return merged


def load_config(config: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a preset/YAML (``None`` = the demo preset), apply overrides, resolve interpolations."""
    cfg = _load_yaml(_resolve_source(DEFAULT_PRESET if config is None else config))
    cfg = apply_overrides(cfg, overrides)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(f"config interpolation failed: {error}") from error
    return cfg


def config_to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: Union[str, Path]) -> Path:
    """Write the resolved config atomically (the run directory's record of what ran)."""
    from .checkpoint import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, config_to_yaml(cfg).encode())
    return path


def require(cfg: DictConfig, key: str):
    """``cfg.<key>`` or a ConfigError naming the missing dotted key."""
    value = OmegaConf.select(cfg, key, default=_MISSING)
    if value is _MISSING:
        raise ConfigError(f"config key {key!r} is required but missing")
    return value


_MISSING = object()
