"""Every stage option has one name and one default in the CLI, the library and the recipe schema.

Generated from the options models (moecompress/options): nothing here lists an option by hand,
so a new option is covered the moment it is declared.
"""

import inspect
import json

import click
import pytest
import typer
from typer.testing import CliRunner

from moecompress.cli import app
from moecompress.options import STAGE_OPTIONS, default_of, fields, flags_of
from moecompress.recipe import STAGES, recipe_schema

IMPLEMENTED = [name for name, model in STAGE_OPTIONS.items() if model.implemented]


def _commands(group: click.Command, path=()):
    yield path, group
    for name, cmd in getattr(group, "commands", {}).items():
        yield from _commands(cmd, (*path, name))


def _command_for(model):
    """The click command generated from ``model`` (found, not listed)."""
    found = [(path, cmd) for path, cmd in _commands(typer.main.get_command(app))
             if getattr(cmd.callback, "options_model", None) is model]
    assert len(found) == 1, (model.__name__, [p for p, _ in found])
    return found[0]


def _library_for(name):
    from moecompress.recipe import library_functions

    return library_functions()[name]


def _jsonable(v):
    return json.loads(json.dumps(v, default=str))


@pytest.mark.parametrize("stage", IMPLEMENTED)
def test_cli_help_has_every_option_with_its_default(stage):
    model = STAGE_OPTIONS[stage]
    path, cmd = _command_for(model)
    params = {p.name: p for p in cmd.params}
    help_text = " ".join(CliRunner().invoke(app, [*path, "--help"], terminal_width=400).output.split())
    for name, info in fields(model, "cli").items():
        assert name in params, (stage, name)
        p = params[name]
        default = default_of(info)
        if default is ...:
            assert p.required, (stage, name)
        else:
            got = p.default if not (p.multiple and p.default is None) else []
            assert _jsonable(got) == _jsonable(default), (stage, name, p.default, default)
        if isinstance(p, click.Option):
            for flag in flags_of(name, info)[0].split("/"):
                assert flag in p.opts + p.secondary_opts, (stage, name, flag)
                assert flag in help_text, (stage, flag)


@pytest.mark.parametrize("stage", IMPLEMENTED)
def test_library_signature_has_every_option_with_its_default(stage):
    model = STAGE_OPTIONS[stage]
    sig = inspect.signature(_library_for(stage)).parameters
    for name, info in fields(model, "library").items():
        assert name in sig, (stage, name)
        default = default_of(info)
        want = inspect.Parameter.empty if default is ... else default
        assert _jsonable(sig[name].default) == _jsonable(want) if want is not inspect.Parameter.empty else \
            sig[name].default is inspect.Parameter.empty, (stage, name)
    # and nothing else that looks like an option: the signature is the model's
    extra = {n for n, p in sig.items() if p.kind is inspect.Parameter.KEYWORD_ONLY} - set(fields(model, "library"))
    assert extra <= {"options", "progress"}, (stage, extra)


@pytest.mark.parametrize("stage", list(STAGE_OPTIONS))
def test_recipe_schema_has_every_option_with_its_default(stage):
    model = STAGE_OPTIONS[stage]
    schema = recipe_schema()[stage]
    assert set(schema["properties"]) == set(fields(model, "recipe")), stage
    for name, info in fields(model, "recipe").items():
        default = default_of(info)
        if default is ...:
            assert name in schema["required"], (stage, name)
        else:
            assert _jsonable(schema["properties"][name].get("default")) == _jsonable(default), (stage, name)
    # recipe options are passed to the library function, so each must exist there
    if model.implemented:
        assert set(fields(model, "recipe")) <= set(fields(model, "library")), stage


def test_every_implemented_stage_has_a_cli_command_and_a_library_function():
    for stage in IMPLEMENTED:
        _command_for(STAGE_OPTIONS[stage])
        assert _library_for(stage).options_model is STAGE_OPTIONS[stage]
    assert set(STAGES) <= set(STAGE_OPTIONS)


@pytest.mark.parametrize("given, want", [("2,3,4,8", [2, 3, 4, 8]), (" 8, 2 ,4", [2, 4, 8]), ("[2, 4]", [2, 4]),
                                         ([4, 2, 4], [2, 4]), ("2,x", None), ("2;4", None), ("2,,4", None),
                                         ("", None), ("9", None), ("0,4", None)])
def test_quantize_candidates_are_read_whole_or_refused(given, want):
    """Every item of --candidates must be a width from 1 to 8: '2,x' is refused, not read as [2]."""
    from pydantic import ValidationError

    from moecompress.options import QuantizeOptions

    if want is None:
        with pytest.raises(ValidationError, match="candidate widths must be integers from 1 to 8"):
            QuantizeOptions(candidates=given)
    else:
        assert QuantizeOptions(candidates=given).candidates == want
