"""Read a run config: YAML file + presets + command-line overrides -> raw nested dict.

Precedence, lowest first: a preset or data config file, the run's YAML file, `key=value` overrides.
YAML is only ever read with `StrictLoader` (`yaml.SafeLoader` that also refuses a repeated key). Turning the
raw dict into typed dataclasses is `ironcore.config.build`; this module only finds, reads and merges text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ironcore.errors import ConfigError

from .schema import GROUPS

_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice; `line` and `first_line` are 1-based."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"key {key!r} is given twice in one mapping")
        self.key, self.line, self.first_line = key, line, first_line


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key repeated in one mapping, where PyYAML silently keeps the last value
    (a typo'd config would train with a setting the user thinks they replaced). Keys brought in by a merge
    (`<<: *base`) may be overridden: only the mapping's own keys are compared."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """Safe-load one YAML mapping, turning every way it can fail into a one-line ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ConfigError(f"{path}: a binary file (NUL byte at offset {nul}); expected a YAML text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                          "expected a UTF-8 YAML file") from None
    if not text.strip():
        raise ConfigError(f"{path}: the file is empty; expected a YAML mapping of config groups")
    try:
        data = yaml.load(text, Loader=StrictLoader)
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}:{err.line}: {err} (first on line {err.first_line}); remove one") from None
    except yaml.reader.ReaderError as err:
        raise ConfigError(f"{path}: character U+{err.character:04X} at offset {err.position} is not allowed in "
                          f"YAML ({err.reason})") from None
    except yaml.constructor.ConstructorError as err:
        line = err.problem_mark.line + 1 if err.problem_mark else "?"
        if "constructor for the tag" in (err.problem or ""):
            raise ConfigError(f"{path}:{line}: tag not allowed ({err.problem}); only plain YAML values are accepted") from None
        raise ConfigError(f"{path}:{line}: {err.problem}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {getattr(err, 'problem', err)}") from None
    if data is None:
        raise ConfigError(f"{path}: the file holds no values; expected a YAML mapping of config groups")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def preset_dirs(config_file: Path | None) -> list[Path]:
    """Where `model: NAME` is looked up: the file's own configs/ tree, ./configs, then the installed presets."""
    dirs = []
    if config_file is not None:
        for parent in config_file.resolve().parents:
            if parent.name == "configs":
                dirs.append(parent)
                break
            if (parent / "configs").is_dir():
                dirs.append(parent / "configs")
                break
    dirs.append(Path.cwd() / "configs")
    dirs.append(shipped_dir("configs"))
    return list(dict.fromkeys(d.resolve() for d in dirs))


def shipped_dir(name: str) -> Path:
    """`configs` or `ds_configs` as shipped: inside the installed package, or the source checkout's copy."""
    installed = Path(__file__).resolve().parents[1] / f"_{name}"
    return installed if installed.is_dir() else _SOURCE_ROOT / name


def find_preset(group: str, name: str, config_file: Path | None) -> Path:
    """Resolve `group: name` to `<configs>/<group>/<name>.yaml`, listing the available names on a miss."""
    filename = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    dirs = preset_dirs(config_file)
    for root in dirs:
        candidate = root / group / filename
        if candidate.is_file():
            return candidate
    available = sorted({p.stem for root in dirs for p in (root / group).glob("*.yaml")})
    raise ConfigError(f"{group}: no preset named {name!r}; available: {', '.join(available) or 'none'}")


def find_data_config(ref: str, config_file: Path | None) -> Path:
    """`data.config_path`: a path (absolute, from the cwd, or from the run file's dir) or a data preset name."""
    path = Path(ref)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    if config_file is not None and not path.is_absolute():
        candidates.append(config_file.resolve().parent / path)
        candidates.extend(root.parent / path for root in preset_dirs(config_file))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if "/" not in ref and not ref.endswith((".yaml", ".yml")):
        return find_preset("data", ref, config_file)
    raise ConfigError(f"data.config_path: file {ref!r} not found (looked in {', '.join(str(c.parent) for c in candidates)})")


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` wins; nested mappings (positional_embedding) merge key by key."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = deep_merge(merged[key], value)
        merged[key] = value
    return merged


def resolve_group(group: str, preset: str | None, inline: dict[str, Any], config_file: Path | None) -> dict[str, Any]:
    """A group's values: its preset (or data config file) first, the inline mapping over it."""
    value = deep_merge(read_yaml(find_preset(group, preset, config_file)) if preset else {}, inline)
    if group == "data" and value.get("config_path"):
        base = read_yaml(find_data_config(str(value["config_path"]), config_file))
        base.pop("config_path", None)
        value = deep_merge(base, value)
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`trainer.micro_batch_size=8` -> (['trainer', 'micro_batch_size'], 8), the value typed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected GROUP.FIELD=VALUE (for example trainer.micro_batch_size=8)")
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw.strip() else ""
    except DuplicateKeyError as err:
        raise ConfigError(f"override {text!r}: {err}") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_dotted(inline: dict[str, Any], keys: list[str], value: Any, text: str) -> None:
    """Set `a.b.c` inside a group's inline mapping, creating nested mappings on the way."""
    node = inline
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {text!r}: {key!r} is a field, not a group")
        node = child
    node[keys[-1]] = value


def unknown_group(name: str, where: str) -> ConfigError:
    from difflib import get_close_matches

    close = get_close_matches(name, GROUPS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown group {name!r}{hint} (groups: {', '.join(GROUPS)})")


def expand_env(value: Any, where: str) -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string; an unset variable without a default is an error."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set (used as ${{{name}}})")

    return _ENV_VAR.sub(substitute, value)


def load_raw(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The merged raw config: presets < the file's groups < overrides, then `${VAR}` expansion."""
    config_file = Path(path) if path is not None else None
    presets: dict[str, str | None] = {}
    inline: dict[str, dict[str, Any]] = {}

    def put_group(group: str, value: Any, where: str) -> None:
        if group not in GROUPS:
            raise unknown_group(str(group), where)
        if isinstance(value, str):
            presets[group], inline[group] = value, {}
        elif isinstance(value, dict):
            presets[group], inline[group] = None, dict(value)
        else:
            raise ConfigError(f"{where}: group {group!r} must be a preset name or a mapping, got {type(value).__name__}")

    if config_file is not None:
        for group, value in read_yaml(config_file).items():
            put_group(group, value, str(config_file))
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) == 1:
            put_group(keys[0], value, f"override {text!r}")
            continue
        if keys[0] not in GROUPS:
            raise unknown_group(keys[0], f"override {text!r}")
        presets.setdefault(keys[0], None)
        set_dotted(inline.setdefault(keys[0], {}), keys[1:], value, text)
    return {
        group: expand_env(resolve_group(group, presets[group], inline[group], config_file), group) for group in inline
    }
