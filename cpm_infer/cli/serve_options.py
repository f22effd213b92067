"""``cpm serve``'s options made from declared dataclasses (``cpm_infer.serve.fields``): the server limits
(``ServeSettings``) and the Ray scaling (``Scaling``) each declare a field once, with its flag, default, range and
help, and the options are generated from that.

``@declared_options(settings=ServeSettings)`` replaces the command's ``settings: Given`` parameter, where it stands,
with one Typer option per field. The command receives what the user gave as a ``Given`` and builds the validated
dataclass with ``.build()``, after any check of its own (Ray options without ``--ray``).
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import Field, dataclass, fields
from typing import Annotated, Any, Generic, TypeVar

import typer

from cpm_infer.serve.fields import flag_name, spec_of

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Given(Generic[T]):
    """The options of one declared dataclass as the user gave them (field name -> value, in the field's units)."""

    cls: type[T]
    values: dict[str, Any]

    def build(self) -> T:
        return self.cls(**self.values)

    def changed_flags(self) -> list[str]:
        """The flags given a value other than their default."""
        return [flag_name(f) for f in fields(self.cls) if self.values[f.name] != f.default]


def declared_options(**groups: type) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorator for a Typer command: each parameter named in ``groups`` becomes the options of that dataclass."""

    def decorate(command: Callable[..., R]) -> Callable[..., R]:
        params: list[inspect.Parameter] = []
        signature = inspect.signature(command, eval_str=True)
        for param in signature.parameters.values():
            cls = groups.get(param.name)
            if cls is None:
                params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            else:
                hints = typing.get_type_hints(cls)
                params += [_option(f, hints[f.name]) for f in fields(cls)]
        if len({p.name for p in params}) != len(params):
            raise TypeError(f"{command.__name__}: a declared field has the name of another parameter")

        @functools.wraps(command)
        def run(**kwargs: Any) -> R:
            for name, cls in groups.items():
                kwargs[name] = Given(cls, {f.name: _from_flag(f, kwargs.pop(f.name)) for f in fields(cls)})
            return command(**kwargs)

        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


def _option(f: Field[Any], hint: Any) -> inspect.Parameter:
    """One Typer option for a declared field: in flag units where the flag counts in a larger unit."""
    s = spec_of(f)
    low = None if s.ge is None else s.ge if s.scale == 1 else math.ceil(s.ge / s.scale)
    high = None if s.le is None else s.le if s.scale == 1 else math.floor(s.le / s.scale)
    default = f.default if s.scale == 1 else f.default // s.scale
    annotation = Annotated[hint, typer.Option(flag_name(f), min=low, max=high, help=s.help)]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _from_flag(f: Field[Any], value: Any) -> Any:
    scale = spec_of(f).scale
    return value if scale == 1 or value is None else value * scale
