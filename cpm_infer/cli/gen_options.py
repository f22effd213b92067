"""The generation options of ``cpm generate`` and ``cpm batch``, made from the declaration in
``cpm_infer.settings`` (flag, help, default), so both commands take the same settings with the same defaults.

``@generation_options("generate")`` replaces a command's ``gen: GenOptions`` parameter with one Typer option
per setting that door takes; the command receives what the user gave as one ``GenOptions`` and turns it into
the validated ``GenerationConfig`` with ``gen.config()``. Values are checked there, not by Typer, so a bad
value is the same one-line error at every door.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from cpm_infer.errors import CpmError
from cpm_infer.settings import Setting, for_door

_LIST_TYPES = {"ids": list[int], "strings": list[str], "bias": list[str]}
_SCALAR_TYPES = {"int": int, "float": float, "bool": bool}


def _help(setting: Setting) -> str:
    return setting.help.rstrip(".") + (f" ({setting.off})." if setting.off else ".")


def _shown_default(setting: Setting) -> bool | str:
    """What ``--help`` shows as the default (the parameter's own default is None: not given)."""
    if setting.kind == "bool":
        return True
    if setting.kind in _LIST_TYPES:
        return False
    default = "off" if setting.default is None else str(setting.default)
    if setting.beam_default != setting.default:
        return f"{default}; {setting.beam_default} with --num-beams"
    return default


def _parameter(setting: Setting) -> inspect.Parameter:
    names = [setting.cli_flag, *([setting.short] if setting.short else [])]
    option = typer.Option(*names, help=_help(setting), metavar=setting.metavar, show_default=_shown_default(setting))
    if setting.kind == "bool":
        kind, default = bool, setting.default
    else:  # None = not given: the default comes from the declaration (it may depend on --num-beams)
        kind, default = (_LIST_TYPES.get(setting.kind) or _SCALAR_TYPES[setting.kind]) | None, None
    return inspect.Parameter(
        setting.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
    )


@dataclass(frozen=True)
class GenOptions:
    """The generation options a command was given (None: not given)."""

    given: dict[str, Any]

    @property
    def beams(self) -> int:
        return self.given.get("num_beams") or 1

    def config(self, **fixed: Any) -> Any:
        """The validated ``GenerationConfig``: given values, else the declared defaults (beam search's where
        ``--num-beams`` > 1); ``fixed`` overrides both. Sampling flags with beam search are refused."""
        from cpm_infer.config import GenerationConfig
        from cpm_infer.settings import BY_NAME

        beams = self.beams > 1
        if beams:
            self._refuse_sampling()
        values: dict[str, Any] = {}
        for name, value in self.given.items():
            setting = BY_NAME[name]
            if value is None:
                value = setting.beam_default if beams else setting.default
            elif setting.kind == "bias":
                value = parse_bias(value)
            values[name] = value
        return GenerationConfig(**{**values, **fixed})

    def _refuse_sampling(self) -> None:
        from cpm_infer.settings import BY_NAME

        flags = [
            BY_NAME[name].cli_flag
            for name, value in self.given.items()
            if value is not None
            and (BY_NAME[name].beams == "ignored" or BY_NAME[name].beam_default != BY_NAME[name].default)
            and value != BY_NAME[name].beam_default
        ]
        if flags:
            raise CpmError(
                f"--num-beams {self.beams} is deterministic beam search: it cannot combine with "
                f"{', '.join(flags)} (sampling)"
            )


def parse_bias(items: list[str]) -> tuple[tuple[int, float], ...]:
    """``ID=BIAS`` strings as (id, bias) pairs."""
    pairs = []
    for item in items:
        token, eq, bias = item.partition("=")
        try:
            if not eq:
                raise ValueError
            pairs.append((int(token), float(bias)))
        except ValueError as exc:
            raise CpmError(f"--logit-bias takes ID=BIAS (e.g. 7=-100), got {item!r}") from exc
    return tuple(pairs)


def generation_options(door: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a Typer command with a ``gen: GenOptions`` parameter (see the module's docstring)."""
    settings = for_door(door)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        params: list[inspect.Parameter] = []
        for param in signature.parameters.values():
            params += [_parameter(s) for s in settings] if param.name == "gen" else [param]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {s.name: kwargs.pop(s.name) for s in settings}
            return command(gen=GenOptions(given), **kwargs)

        # Typer reads the signature: keyword-only keeps the order valid whatever the defaults.
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate
