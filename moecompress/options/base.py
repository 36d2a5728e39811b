"""One options model per stage: the single source of each option's name, type, default, range
and help, from which the Typer command, the library function's signature and the recipe schema
are generated (as mergekit generates its click flags from ``MergeOptions``).

* :func:`option` declares a field: default, help, range (``ge``/``le``/``gt``/``lt``), the
  command-line flags, the help panel, and where the option exists (``cli``, ``library``,
  ``recipe``: an output-file option like ``--json`` is the command's, not the library's).
* :func:`cli_command` turns a model into Typer parameters of a command function.
* :func:`library_function` gives a library function the model's fields as keyword arguments
  (its ``inspect.signature`` lists them with their defaults) and validates them once.
* :func:`recipe_fields` is what a recipe stage may set; :func:`validate` the one-line error.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from ..errors import MoECompressError


class Options(BaseModel):
    """Base of every stage's options: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)

    # False for stages declared here before their implementation landed: `run` refuses them.
    implemented: typing.ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _paths_as_text(cls, values: Any) -> Any:
        """A path given for a text option (calib, base, tokenizer) is its text, as on the command line."""
        if isinstance(values, dict):
            return {k: str(v) if isinstance(v, PurePath) and k in cls.model_fields and
                    "Path" not in str(cls.model_fields[k].annotation) else v for k, v in values.items()}
        return values

    def experts_after(self, num_experts: int) -> int | None:
        """Experts per MoE layer this stage leaves of ``num_experts`` (``None``: not known before
        it runs); raises the stage's own one-line error where its options ask for more experts
        than there are. Stages that remove or merge experts override it; the recipe runner checks
        every stage's count against those the earlier stages leave before any stage runs."""
        return num_experts

    def recorded(self) -> dict[str, Any]:
        """Every recipe option, resolved, as JSON types: what a stage records in moecompress.json."""
        return self.model_dump(mode="json", include=set(recipe_fields(type(self))))


def option(default: Any = ..., help: str = "", *, flags: tuple[str, ...] = (), panel: str | None = None,
           cli: bool = True, library: bool = True, recipe: bool = True, argument: bool = False,
           ge: float | None = None, le: float | None = None, gt: float | None = None, lt: float | None = None) -> Any:
    """A stage option; ``flags`` default to ``--name-with-dashes`` (bools with a True default
    get ``--name/--no-name``)."""
    extra = {"flags": list(flags), "panel": panel, "cli": cli, "library": library, "recipe": recipe,
             "argument": argument}
    return Field(default, description=help, ge=ge, le=le, gt=gt, lt=lt, json_schema_extra=extra)


def _extra(info: FieldInfo) -> dict:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def fields(model: type[Options], where: str) -> dict[str, FieldInfo]:
    """The model's fields that exist in ``where`` ('cli', 'library' or 'recipe'): the stage's
    own first, then its groups' in the order the class lists them."""
    order: list[str] = []
    for cls in model.__mro__:
        for name in cls.__dict__.get("__annotations__", {}):
            if name in model.model_fields and name not in order:
                order.append(name)
    return {n: model.model_fields[n] for n in order if _extra(model.model_fields[n]).get(where, True)}


def recipe_fields(model: type[Options]) -> dict[str, FieldInfo]:
    return fields(model, "recipe")


def flags_of(name: str, info: FieldInfo) -> list[str]:
    given = _extra(info).get("flags") or []
    if given:
        return list(given)
    dashed = "--" + name.replace("_", "-")
    if info.annotation is bool and info.default is True:
        return [f"{dashed}/--no-{name.replace('_', '-')}"]
    return [dashed]


def cli_flag(model: type[Options], name: str) -> str:
    """The first command-line flag of option ``name`` (``--seq-len``), or the name itself."""
    info = model.model_fields.get(name)
    return flags_of(name, info)[0].split("/")[0] if info is not None else name


def default_of(info: FieldInfo) -> Any:
    """The default as a caller sees it (``...`` for a required option)."""
    return ... if info.is_required() else info.get_default(call_default_factory=True)


def one_line_error(e: ValidationError, where: str = "", line_of: Callable[[str], int | None] | None = None,
                   label: Callable[[str], str] | None = None) -> str:
    """The first problem of a validation error as one line: where, key, line, what is wrong."""
    err = e.errors()[0]
    key = ".".join(str(x) for x in err["loc"]) or "options"
    line = line_of(key) if line_of else None
    key = label(key) if label else key
    at = f" (line {line})" if line else ""
    if err["type"] == "extra_forbidden":
        return f"{where}{key}{at}: unknown option"
    if err["type"] == "missing":
        return f"{where}{key}{at}: required option is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a check across options
        return f"{where}{msg}"
    if err["type"] == "value_error":  # our own check: its message already says what to do
        return f"{where}{key}{at}: {msg}"
    return f"{where}{key}{at}: {msg} (got {err.get('input')!r})"


def validate(model: type[Options], values: dict, where: str = "",
             line_of: Callable[[str], int | None] | None = None, label: Callable[[str], str] | None = None) -> Options:
    """``model(**values)`` or a one-line :class:`MoECompressError` naming the key."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        msg = one_line_error(e, where, line_of, label)
        if e.errors()[0]["type"] == "extra_forbidden":
            msg += f"; options: {', '.join(recipe_fields(model))}"
        raise MoECompressError(msg) from None


# ----- Typer -----------------------------------------------------------------------------------
def _typer_type(annotation: Any) -> Any:
    """The annotation Typer understands for a field's annotation (Optional / list / Literal kept)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = _typer_type(args[0]) if len(args) == 1 else str
        return Optional[inner]
    if origin in (list, tuple) or annotation is list:
        args = typing.get_args(annotation)
        return list[_typer_type(args[0]) if args else str]
    if origin is Literal:  # checked by pydantic, so that a wrong value is one line like any other
        return str
    return annotation


def choices(annotation: Any) -> list[str] | None:
    """The allowed values of a Literal (or Optional Literal) annotation."""
    for a in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(a) is Literal:
            return [str(c) for c in typing.get_args(a)]
    return None


def typer_parameters(model: type[Options]) -> list[inspect.Parameter]:
    import typer

    params = []
    for name, info in fields(model, "cli").items():
        extra = _extra(info)
        default = default_of(info)
        if extra.get("argument"):
            meta = typer.Argument(help=info.description)
        else:
            allowed = choices(info.annotation)
            text = info.description + (f" One of: {', '.join(allowed)}." if allowed else "")
            meta = typer.Option(*flags_of(name, info), help=text, rich_help_panel=extra.get("panel"))
        ann = typing.Annotated[_typer_type(info.annotation), meta]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann,
                                        default=inspect.Parameter.empty if default is ... else default))
    return params


def cli_command(model: type[Options]) -> Callable[[Callable], Callable]:
    """Decorate a command ``fn(own params..., opts: Model)``: Typer sees ``fn``'s own parameters
    followed by one parameter per CLI field of ``model``; ``fn`` receives the validated model
    (a bad value is one line and exit 2)."""

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for n, p in sig.parameters.items() if n != "opts"]
        generated = typer_parameters(model)
        names = {p.name for p in generated}

        @functools.wraps(fn)
        def command(**kwargs):
            from ..commands._common import user_errors

            values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            with user_errors():
                opts = validate(model, values, label=lambda k: cli_flag(model, k))
            return fn(**kwargs, opts=opts)

        command.__signature__ = sig.replace(parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if
                                                        p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD else p
                                                        for p in own] + generated)
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        del command.__wrapped__  # typer must read __signature__, not fn's
        command.options_model = model
        return command

    return decorate


# ----- library ----------------------------------------------------------------------------------
def library_function(model: type[Options]) -> Callable[[Callable], Callable]:
    """Decorate ``fn(positional..., *, opts: Model, extra...)``: the result takes the model's
    library fields as keyword arguments (listed with their defaults in its signature), or a
    ready ``options=Model(...)``, and calls ``fn`` with one validated model."""

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        head = [p for n, p in sig.parameters.items() if n != "opts" and p.kind is not inspect.Parameter.KEYWORD_ONLY]
        tail = [p for n, p in sig.parameters.items() if n != "opts" and p.kind is inspect.Parameter.KEYWORD_ONLY]
        lib = fields(model, "library")
        # options the command takes as arguments (upload's repo_id) may be positional here too
        positional = [n for n, f in lib.items() if _extra(f).get("argument")]
        generated = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD if n in positional else
                                       inspect.Parameter.KEYWORD_ONLY, annotation=f.annotation,
                                       default=inspect.Parameter.empty if default_of(f) is ... else default_of(f))
                     for n, f in lib.items()]
        generated.sort(key=lambda p: p.kind)
        tail_names = {p.name for p in tail}

        @functools.wraps(fn)
        def wrapper(*args, options: Options | None = None, **kwargs):
            if len(args) > len(head):
                kwargs.update(zip(positional, args[len(head):]))
                args = args[:len(head)]
            extra = {k: kwargs.pop(k) for k in list(kwargs) if k in tail_names}
            if options is not None:
                if kwargs:
                    raise MoECompressError(f"pass either options= or keyword options, not both ({', '.join(kwargs)})")
                opts = options
            else:
                unknown = sorted(set(kwargs) - set(lib))
                if unknown:
                    raise MoECompressError(f"unknown option(s) {', '.join(unknown)} for {fn.__name__}; "
                                           f"options: {', '.join(lib)}")
                opts = validate(model, kwargs)
            return fn(*args, opts=opts, **extra)

        options_param = inspect.Parameter("options", inspect.Parameter.KEYWORD_ONLY, default=None)
        wrapper.__signature__ = sig.replace(parameters=head + generated + [options_param] +
                                            tail)
        del wrapper.__wrapped__
        wrapper.options_model = model
        return wrapper

    return decorate


__all__ = ["Options", "option", "fields", "recipe_fields", "flags_of", "default_of", "validate", "one_line_error",
           "cli_command", "library_function", "typer_parameters", "Literal", "Path"]
