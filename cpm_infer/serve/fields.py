"""Settings declared once: a dataclass field made with ``setting()`` carries its default, range, help and the names
it has outside Python. Everything else is derived from it:

- the dataclass checks itself (``check_fields`` in its ``__post_init__``: one-line ``ConfigError``s);
- the CLI generates one option per field (``cpm_infer.cli.serve_options``);
- ``serve run`` / KubeRay arguments are the dataclass validated by pydantic (``ray_app.parse_build_args``).

Light on purpose (no pydantic, no typer): ``cpm --help`` imports the declarations.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any

from cpm_infer.config import ConfigError

_SPEC = "cpm_infer.setting"


@dataclass(frozen=True)
class Spec:
    """What a declared field says besides its type and default.

    ``ge``/``le``: its range (a None value, for an optional field, is always allowed); ``choices``: the only values
    a string may take. ``label`` and ``unit`` word its error messages (default label: the name, with spaces).
    ``arg``: its name outside Python (``serve run`` arguments, environment, flag) where it differs from the field's;
    ``flag``: the CLI flag where it is not ``--arg-name``; ``scale``: the flag counts in units of ``scale``
    (``--max-body-kb`` sets ``max_body_bytes``).
    """

    help: str
    ge: float | None = None
    le: float | None = None
    choices: tuple[str, ...] = ()
    label: str = ""
    unit: str = ""
    arg: str = ""
    flag: str = ""
    scale: int = 1


def setting(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field declared once (see ``Spec`` for ``spec``)."""
    return field(default=default, metadata={_SPEC: Spec(help, **spec)})


def spec_of(f: Field[Any]) -> Spec:
    """The declaration of ``f`` (a plain field declares only its help-less name)."""
    return f.metadata.get(_SPEC) or Spec("")


def arg_name(f: Field[Any]) -> str:
    return spec_of(f).arg or f.name


def flag_name(f: Field[Any]) -> str:
    return spec_of(f).flag or "--" + arg_name(f).replace("_", "-")


def arg_names(cls: type) -> dict[str, str]:
    """Outside name -> field name, for every field of ``cls``."""
    return {arg_name(f): f.name for f in fields(cls)}


def check_fields(obj: Any) -> None:
    """Raise ``ConfigError`` for the first field outside its declared range or choices."""
    for f in fields(obj):
        s, value = spec_of(f), getattr(obj, f.name)
        label, unit = s.label or f.name.replace("_", " "), f" {s.unit}" if s.unit else ""
        if value is None:
            continue
        if s.choices and value not in s.choices:
            raise ConfigError(f"{label} must be {' or '.join(map(repr, s.choices))}, got {value!r}")
        if s.ge is not None and not value >= s.ge:  # (NaN is out of every range)
            raise ConfigError(f"{label} must be >= {s.ge}{unit}, got {value}")
        if s.le is not None and not value <= s.le:
            raise ConfigError(f"{label} must be <= {s.le}{unit}, got {value}")
