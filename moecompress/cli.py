"""The `moecompress` command line: a thin layer over the library.

Each stage lives in ``moecompress/commands/<stage>.py`` and registers itself on ``app``.
Errors never reach the user as a traceback (:class:`_SafeGroup`): ``MoECompressError`` and the
exceptions :func:`moecompress.errors.translate` knows print one line with exit code 2; any
other exception prints one line plus "re-run with --debug for the traceback" with exit code 1;
Ctrl-C prints one line with exit code 130 (outputs are only renamed into place when complete).

Options every command takes (added to each command here, so that no stage has to declare
them): ``--debug`` (show tracebacks); on commands that load a model also
``--trust-remote-code`` and ``--allow-nonfinite`` (``guards.loading_policy``).
"""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, Exit
from typer._click.exceptions import ClickException

from .commands import register_all

# Commands that never load a model (no --trust-remote-code / --allow-nonfinite).
_NO_MODEL = {"upload", "show", "check"}


def _set_policy(ctx, param, value):
    from .guards import set_policy

    if value:
        set_policy(**{param.name: True})
    return value


def _set_debug(ctx, param, value):
    if value:
        ctx.find_root().meta["moecompress_debug"] = True
    return value


def _flag_prototypes() -> dict:
    """The shared flags as typer parameters (built by typer from a prototype command, so that
    they parse and show in --help like every other option), by name."""
    proto = typer.Typer()

    @proto.command()
    def _proto(
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", callback=_set_policy, is_eager=True,
                                               help="Allow the checkpoint's own Python code (auto_map) to run; "
                                                    "never asked interactively."),
        allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", callback=_set_policy, is_eager=True,
                                             help="Proceed although input weights hold NaN or Inf."),
        debug: bool = typer.Option(False, "--debug", callback=_set_debug, is_eager=True,
                                   help="Show the full traceback of an unexpected error."),
    ) -> None:
        pass

    params = {p.name: p for p in typer.main.get_command(proto).params}
    for p in params.values():
        p.expose_value = False  # the commands' functions never see them
    return params


_FLAGS = _flag_prototypes()


def _common_options(cmd) -> None:
    """Give ``cmd`` (and a group's subcommands) the shared flags, once."""
    if getattr(cmd, "_moecompress_common", False):
        return
    cmd._moecompress_common = True
    if isinstance(cmd, TyperGroup):
        for sub in cmd.commands.values():
            _common_options(sub)
        return
    have = {p.name for p in cmd.params}
    wanted = ["debug"] if cmd.name in _NO_MODEL else ["trust_remote_code", "allow_nonfinite", "debug"]
    cmd.params.extend(_FLAGS[n] for n in wanted if n not in have)


class _SafeGroup(TyperGroup):
    def get_command(self, ctx, cmd_name):
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            _common_options(cmd)
        return cmd

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (Exit, Abort, ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            _say("interrupted; nothing was written to the output (a completed output is renamed into place only "
                 "at the end)")
            raise Exit(130) from None
        except Exception as e:
            if ctx.meta.get("moecompress_debug") or os.environ.get("MOECOMPRESS_DEBUG"):
                raise
            from .errors import translate

            try:
                msg = translate(e)
            except Exception:  # the error path itself must not fail
                msg = None
            if msg is not None:
                _say(msg)
                raise Exit(2) from None
            first = (str(e).strip().splitlines() or [""])[0][:300]
            _say(f"unexpected error ({type(e).__name__}{': ' + first if first else ''}); "
                 "re-run with --debug for the traceback")
            raise Exit(1) from None


def _say(message: str) -> None:
    from .commands._common import print_error

    print_error(message)


app = typer.Typer(
    name="moecompress",
    cls=_SafeGroup,
    help="Compress Mixture-of-Experts language models: stats, prune, merge, quantize, distill, eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
register_all(app)


def main() -> None:
    app(prog_name="moecompress")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
