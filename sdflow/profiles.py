"""Load run profiles by name or path, apply `--set key=value` overrides, report every problem at once.

The config schema (pydantic) is imported only where a profile is validated: `sdflow profiles` lists
names and descriptions without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sdflow.errors import UserError

if TYPE_CHECKING:
    from pydantic import ValidationError

    from sdflow.config import RunConfig

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


class ConfigError(UserError):
    """A profile or override that does not fit the schema; the message lists every problem."""


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_path(name_or_path: str) -> Path:
    """A profile name in `profiles/`, or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"} or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"Profile file {name_or_path!r} does not exist.")
        return candidate
    named = PROFILES_DIR / f"{name_or_path}.yaml"
    if not named.is_file():
        raise ConfigError(
            f"Unknown profile {name_or_path!r}. Known profiles: {', '.join(profile_names())}; "
            "or give a path to a YAML file."
        )
    return named


def load_profile(name_or_path: str, overrides: list[str] = ()) -> RunConfig:
    """Read a profile, apply overrides, validate; raises ConfigError listing every problem."""
    from pydantic import ValidationError

    from sdflow.config import RunConfig

    path = profile_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Profile {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"Profile {path} must be a mapping of sections, not {type(data).__name__}."
        )
    problems: list[str] = []
    for item in overrides:
        try:
            apply_override(data, item)
        except ValueError as exc:
            problems.append(str(exc))
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(describe_errors(exc))
        config = None
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"Profile {path} has {len(problems)} problem(s):\n{lines}")
    return config


def apply_override(data: dict[str, Any], item: str) -> None:
    """`train.lr=1e-5` sets data['train']['lr']; the value is parsed as YAML, typed by the schema.
    A number indexes a list: `subsets.0.source.path=./chars` sets the first subset's path."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} must look like section.key=value")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = _child(node, part, item)
    if isinstance(node, list):
        raise ValueError(f"override {item!r}: {parts[-1]!r} replaces a list entry; set its keys")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _child(node: dict | list, part: str, item: str) -> Any:
    """The section (or list entry) `part` of `node`, a new section where a mapping lacks it."""
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ValueError(
                f"override {item!r}: {part!r} is not an index of a list of {len(node)} entries"
            )
        child = node[int(part)]
    else:
        child = node.setdefault(part, {})
    if not isinstance(child, dict | list):
        raise ValueError(f"override {item!r}: {part!r} is not a section")
    return child


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per problem: key path, bad value, what is allowed."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(allowed_keys(err["loc"][:-1]))
            lines.append(f"{loc}: unknown key (value {value!r}); allowed keys here: {allowed}")
        elif err["type"] == "missing":
            lines.append(f"{loc}: required, but missing")
        else:
            message = err["msg"].removeprefix("Value error, ")
            shown = "" if isinstance(value, dict) else f" = {value!r}"
            lines.append(f"{loc}{shown}: {message}")
    return lines


def allowed_keys(loc: tuple) -> list[str]:
    from pydantic import BaseModel

    from sdflow.config import RunConfig

    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def profile_description(name: str) -> str:
    data = yaml.safe_load(profile_path(name).read_text()) or {}
    return str(data.get("description", "")).strip()
