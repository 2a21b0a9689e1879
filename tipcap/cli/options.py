"""Options shared by the commands, and the options of a stage generated from its config dataclass.

A stage command (``embed``, ``fit-gap``, ``evaluate``, ``caption``) has one option per field of its config
(:mod:`tipcap.config`), as transformers' ``HfArgumentParser`` makes arguments of a dataclass: the flag is
the field's name (``--noise-scale`` for ``gap.noise_scale``), its type and range come from the field's
annotation, its help from the field's ``help`` metadata. Besides them, ``--config FILE`` reads the stage's
section of a YAML or JSON file and ``--set section.key=value`` sets one key. Each value comes from the
first of: ``--set``, a flag given on the command line, the file, the option's default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import annotated_types
import click
from click.core import ParameterSource

from tipcap.errors import TipcapError

SECTIONS = ("embed", "gap", "model", "data", "train", "eval")
"""The sections a config file may hold, one per stage; a command reads its own and leaves the others."""
_GIVEN = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


SEED = click.IntRange(0, 2**32 - 1)
"""A ``--seed`` option's type: :data:`tipcap.config.Seed`'s range, so that a seed the stages would refuse
deep inside (numpy's and torch's seeding) is refused by its flag."""


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, which lets NaN through (every comparison with NaN is false), refusing it."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number.", param, ctx)
        return number


class CommaList(click.ParamType):
    """A comma-separated list of choices: ``bleu,cider`` → ``["bleu", "cider"]``."""

    name = "list"

    def __init__(self, choices: Sequence[str]) -> None:
        self.choices = tuple(choices)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + ",".join(self.choices) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):
            return value
        items = [item.strip() for item in str(value).split(",") if item.strip()]
        unknown = [item for item in items if item not in self.choices]
        if unknown:
            self.fail(f"{unknown[0]!r} is not one of {', '.join(self.choices)}.", param, ctx)
        return items


def check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse a device this machine does not have before any work starts."""
    if value is not None:
        from tipcap.clip import resolve_device

        try:
            resolve_device(value)
        except TipcapError as e:
            raise click.BadParameter(str(e).split(": ", 1)[1]) from None
    return value


def device_option(default: str | None = None, help_text: str | None = None) -> Any:
    """``--device``, checked against this machine's devices."""
    return click.option(
        "--device",
        default=default,
        show_default=default is not None,
        callback=check_device,
        help=help_text or "Device (default: cuda when available, else cpu).",
    )


def stacked(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One decorator of several, listed in the order ``--help`` shows them."""

    def decorate(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _click_type(annotation: Any) -> tuple[Any, bool]:
    """The click type of a config field's annotation, and whether it is a boolean flag.

    ``Annotated`` bounds (pydantic's ``Field(ge=...)``) become ranges, ``Literal`` a choice, a list of
    ``Literal`` a comma-separated list; ``X | None`` is ``X`` (no flag sets None).
    """
    bounds: dict[str, Any] = {}
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extras = typing.get_args(annotation)
        for extra in extras:
            for item in [extra, *getattr(extra, "metadata", [])]:
                if isinstance(item, annotated_types.Ge):
                    bounds["min"] = item.ge
                elif isinstance(item, annotated_types.Gt):
                    bounds.update(min=item.gt, min_open=True)
                elif isinstance(item, annotated_types.Le):
                    bounds["max"] = item.le
                elif isinstance(item, annotated_types.Lt):
                    bounds.update(max=item.lt, max_open=True)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _click_type(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return click.Choice(typing.get_args(annotation)), False
    if origin is list:
        (item,) = typing.get_args(annotation)
        return CommaList(typing.get_args(item)), False
    if annotation is bool:
        return None, True
    if annotation is int:
        return (click.IntRange(**bounds) if bounds else click.INT), False
    if annotation is float:
        # NaN passes click's ranges; validation refuses it, naming the flag (StageOptions.build).
        return (click.FloatRange(**bounds) if bounds else click.FLOAT), False
    if annotation is str:
        return click.STRING, False
    raise TypeError(f"no command-line option for a config field of type {annotation!r}")


@dataclasses.dataclass(frozen=True)
class StageOptions:
    """The options a command makes of the fields of one config section.

    ``fields`` are the fields it reads (default: all); ``flags`` renames a field's flag (``{"model":
    "clip"}`` gives ``--clip``); ``defaults`` and ``helps`` replace a field's default and help for this
    command; ``shown`` replaces the default that ``--help`` shows; ``required`` fields must be given by the
    flag, the file or ``--set``.
    """

    cls: type
    section: str
    fields: tuple[str, ...] = ()
    flags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    helps: Mapping[str, str] = dataclasses.field(default_factory=dict)
    shown: Mapping[str, str] = dataclasses.field(default_factory=dict)
    required: tuple[str, ...] = ()

    def names(self) -> list[str]:
        """The fields this command reads, in the dataclass's order."""
        every = [f.name for f in dataclasses.fields(self.cls)]
        return [name for name in every if not self.fields or name in self.fields]

    def flag(self, name: str) -> str:
        """The command-line flag of field ``name``."""
        return "--" + self.flags.get(name, name).replace("_", "-")

    def options(self, command: Any) -> Any:
        """Decorate ``command`` with one option per field, then ``--config`` and ``--set``."""
        hints = typing.get_type_hints(self.cls, include_extras=True)
        fields = {f.name: f for f in dataclasses.fields(self.cls)}
        options = []
        for name in self.names():
            field = fields[name]
            default = self.defaults.get(name, _default(field))
            click_type, flag = _click_type(hints[name])
            text = self.helps.get(name, field.metadata.get("help", ""))
            shown: Any = self.shown.get(name, default not in (None, ""))
            if name in self.required:
                text += "  [required: this flag, --config or --set]"
            declared = f"{self.flag(name)}/--no-{self.flag(name)[2:]}" if flag else self.flag(name)
            options.append(
                click.option(declared, name, type=click_type, default=default, show_default=shown, help=text)
            )
        section = f"'{self.section}'"
        options += [
            click.option(
                "--config",
                "config_path",
                type=click.Path(dir_okay=False),
                default=None,
                help=f"YAML or JSON file whose {section} section sets these options (other stages' sections "
                "are ignored). A flag given overrides the file, and --set overrides both.",
            ),
            click.option(
                "--set",
                "overrides",
                multiple=True,
                metavar="KEY=VALUE",
                help=f"Set a key of the {section} section, e.g. {self.section}.{self.names()[0]}=... "
                "(repeatable; applied last).",
            ),
        ]
        return stacked(*options)(command)

    def values(self, ctx: click.Context) -> dict[str, Any]:
        """The section's keys, before validation: defaults, then the file, then the flags given, then
        ``--set`` (see the module's docstring). A required key given nowhere is a :class:`TipcapError`."""
        from tipcap.config import apply_overrides, read_yaml_mapping

        params = ctx.params
        values = {name: params[name] for name in self.names()}
        if params["config_path"] is not None:
            path, sections = params["config_path"], ", ".join(SECTIONS)
            document = read_yaml_mapping(
                Path(path), f"--config {path}: no such file.", f"a mapping of sections ({sections})"
            )
            unknown = [key for key in document if key not in SECTIONS]
            if unknown:
                raise TipcapError(
                    f"--config {path}: unknown section '{unknown[0]}'; the sections are {sections}."
                )
            section = document.get(self.section) or {}
            if not isinstance(section, dict):
                raise TipcapError(f"--config {path}: section '{self.section}' is not a mapping.")
            values.update(section)
        values.update({name: params[name] for name in self.names() if self.given(ctx, name)})
        data = {self.section: values}
        for override in params["overrides"]:
            apply_overrides(data, [override])
            key = override.split("=", 1)[0].strip()
            if set(data) != {self.section} or key.split(".")[0] != self.section:
                raise TipcapError(f"--set {override!r}: {_command(ctx)} sets '{self.section}.' keys only.")
            if key.count(".") == 1 and key.split(".")[1] not in self.names() and self.fields:
                raise TipcapError(
                    f"--set {override!r}: {_command(ctx)} reads {', '.join(self.names())} of "
                    f"'{self.section}' only."
                )
        for name in self.required:
            if data[self.section].get(name) in (None, ""):
                raise TipcapError(
                    f"{self.flag(name)} is required (or {self.section}.{name} in --config or --set)."
                )
        return data[self.section]

    def given(self, ctx: click.Context, name: str) -> bool:
        """Whether option ``name`` was given on the command line (or by its environment variable)."""
        return ctx.get_parameter_source(name) in _GIVEN

    def build(self, ctx: click.Context, values: dict[str, Any] | None = None) -> Any:
        """The validated config of :meth:`values` (or of ``values``); a mistake names the flag when the
        value came from it, else the config key."""
        from tipcap.config import from_dict

        values = self.values(ctx) if values is None else values
        try:
            return from_dict(self.cls, values, self.section)
        except TipcapError as e:
            message = str(e)
            set_keys = {override.split("=", 1)[0].strip() for override in ctx.params["overrides"]}
            for name in self.names():
                key = f"{self.section}.{name}"
                if f"config key '{key}'" in message and self.given(ctx, name) and key not in set_keys:
                    message = message.replace(f"config key '{key}'", self.flag(name))
            raise TipcapError(message) from None


def _command(ctx: click.Context) -> str:
    """``tipcap embed texts``: the command's name as a user types it (click's path starts with the program's
    name, ``python -m tipcap.cli`` for some)."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(["tipcap", *reversed(names)])


def _default(field: dataclasses.Field) -> Any:
    """A field's default (a fresh one from its factory)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default
