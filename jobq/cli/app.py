"""What every jobq command shares: the ``jobq`` group, its state, one-line errors with a
documented exit code (:mod:`jobq.exitcodes`; ``--debug`` adds the traceback), the decorator of
a command that talks to the server, and the options that mirror config keys."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click
import redis

from .. import exitcodes
from ..config import CONFIG_ENV, FLAGS, Config, ConfigError, choices, load_config, value_type
from ..connection import ServerProblem, check_server, describe_error
from ..queue import JobQueue
from ..server import ServerError, resolve_url
from ..urls import redact

_connection_errors = (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError,
                      redis.exceptions.InvalidResponse)

#: What a click option decorator applies to: a command's function, or a built command.
_Decorated = TypeVar("_Decorated", bound=Callable[..., Any] | click.Command)


class CliError(click.ClickException):
    """An error shown as one line, with its exit code."""

    def __init__(self, message: str, code: int = exitcodes.FAILURE) -> None:
        super().__init__(message)
        # click types exit_code as one value per class; a CliError carries the code it is given
        self.exit_code = code  # type: ignore[misc]

    def show(self, file: Any = None) -> None:
        click.echo(f"jobq: error: {self.format_message()}", err=True)


class State:
    """What the group's options set up, shared by every command (``ctx.obj``)."""

    def __init__(self, redis_url: str | None, config_path: str | None, debug: bool,
                 log_level: str | None, log_format: str | None) -> None:
        self.redis_url = redis_url
        self.config_path = config_path
        self.debug = debug
        self.log_level = log_level
        self.log_format = log_format
        self._config: Config | None = None

    def use(self, redis_url: str | None = None, config_path: str | None = None,
            log_level: str | None = None, log_format: str | None = None,
            debug: bool = False) -> None:
        """Apply the global options given after the command's name: they win over those
        given before it."""
        for name, value in (("redis_url", redis_url), ("config_path", config_path),
                            ("log_level", log_level), ("log_format", log_format)):
            if value:
                setattr(self, name, value)
                self._config = None
        self.debug = self.debug or debug

    def config(self, **overrides: Any) -> Config:
        if self._config is None or overrides:
            self._config = load_config(self.config_path, redis_url=self.redis_url,
                                       log_level=self.log_level, log_format=self.log_format,
                                       **overrides)
        return self._config

    def queue(self, name: str | None = None) -> JobQueue:
        """A :class:`JobQueue` on the server: of queue ``name``, else of the config's first
        queue. On a Cluster that is the namespace of the config's queue group: what the masters
        started with this config serve (commands about jobs by id, info, workers, limits)."""
        config = self.config()
        return JobQueue(name or config.queues[0], redis_url=self.url(), config=config)

    def url(self, *, wait: bool = True) -> str:
        """The server's URL, once it answers as a server jobq can use: one line and exit 3
        when it is not one, or (``wait``) when nothing answered within ``connect_timeout``."""
        config = self.config()
        try:
            url = resolve_url(config)
        except ServerError as exc:
            raise CliError(f"cannot start the embedded server: {exc}", exitcodes.SERVER) from exc
        try:
            check_server(url, timeout=config.connect_timeout if wait else 0)
        except ServerProblem as exc:
            if wait or exc.lasting:
                if self.debug:  # the error underneath, as --debug promises
                    traceback.print_exception(exc.__cause__ or exc)
                raise CliError(str(exc), exitcodes.CONNECT) from None
        return url


def run_guarded(fn: Callable[[], Any], state: State) -> Any:
    """Run ``fn``; turn the errors users cause into one line and an exit code."""
    debug = state.debug
    url = state.redis_url or (state._config.redis_url if state._config else "") or ""
    try:
        return fn()
    except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
        raise
    except BrokenPipeError:  # no failure of the command: the group ends it quietly
        raise
    except ConfigError as exc:
        _fail(debug, str(exc), exitcodes.USAGE)
    except _connection_errors as exc:
        _fail(debug, describe_error(exc, url or "the server"), exitcodes.CONNECT)
    except redis.ResponseError as exc:
        text = str(exc)
        if text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
            _fail(debug, describe_error(exc, url or "the server"), exitcodes.CONNECT)
        _fail(debug, f"server error: {text}", exitcodes.FAILURE)
    except KeyboardInterrupt:
        _fail(debug, "interrupted", 130)
    except (ValueError, TypeError) as exc:  # bad input that got past click's own checks
        _fail(debug, _scrubbed(str(exc), url), exitcodes.USAGE)
    except Exception as exc:
        _fail(debug, _scrubbed(f"{type(exc).__name__}: {exc}", url), exitcodes.FAILURE)


def output_closed() -> NoReturn:
    """Whoever read our output stopped (``jobq dlq list | head -1``): stop quietly, exit 0,
    as Unix tools do. Standard output goes to /dev/null first, so that flushing what is left
    in its buffer at exit raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass  # no file descriptor (a test's stream): nothing is flushed to a pipe at exit
    sys.exit(exitcodes.OK)


def _scrubbed(message: str, url: str) -> str:
    """The message without the URL's password, should an exception have quoted the URL."""
    return message.replace(url, redact(url)) if url else message


def _fail(debug: bool, message: str, code: int) -> NoReturn:
    if debug:
        traceback.print_exc()
    click.echo(f"jobq: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def config_option(key: str) -> Callable[[_Decorated], _Decorated]:
    """The option of config key ``key``, spelled and explained as :data:`jobq.config.FLAGS`
    says, with the type and the choices of the key's rule.

    Its value is None when not given (the config's value stands; ``load_config`` ignores None
    overrides); a list key's value is a list (``-q high,default``), or a tuple if repeatable.
    """
    flag = FLAGS[key]
    attrs: dict[str, Any] = {"help": flag.help, "metavar": flag.metavar}
    if flag.repeat:
        attrs["multiple"] = True
    else:
        attrs["default"] = None
        kind = value_type(key)
        if kind is list:
            attrs["callback"] = _comma_list
        elif choices(key):
            attrs["type"] = click.Choice(choices(key))
        elif kind is not str:
            attrs["type"] = kind
    return click.option(*flag.flags, key, **attrs)


def _comma_list(ctx: click.Context, param: click.Parameter, value: str | None
                ) -> list[str] | None:
    """``high, default`` -> ``["high", "default"]``; an empty value is no value."""
    if not value:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def config_file_option() -> Callable[[_Decorated], _Decorated]:
    """--config FILE: the TOML file the config keys come from (parameter ``config_path``)."""
    return click.option("--config", "config_path", default=None, metavar="FILE",
                        help=f"TOML config file (default: ${CONFIG_ENV}).")


def debug_option() -> Callable[[_Decorated], _Decorated]:
    """--debug: errors show their traceback too."""
    return click.option("--debug", is_flag=True, help="Show tracebacks of errors.")


def global_options() -> list[Callable[[_Decorated], _Decorated]]:
    """The options of the ``jobq`` group, which every command takes after its name too."""
    return [config_option("redis_url"), config_file_option(), config_option("log_level"),
            config_option("log_format"), debug_option()]


def jobq_command(group: click.Group, name: str | None = None, **attrs: Any
                 ) -> Callable[[Callable[..., int]], click.Command]:
    """Register ``fn(state, **params) -> exit code`` as command ``name`` of ``group``.

    The command also takes the global options (--redis-url, --config, --log-level,
    --log-format, --debug: they work before its name too), gets the :class:`State` first,
    runs under :func:`run_guarded` (an error is one line and a documented exit code) and
    exits with the code ``fn`` returns. ``attrs`` go to ``group.command``.
    """

    def decorate(fn: Callable[..., int]) -> click.Command:
        @functools.wraps(fn)
        @click.pass_obj
        def run(state: State, redis_url: str | None = None, config_path: str | None = None,
                log_level: str | None = None, log_format: str | None = None,
                debug: bool = False, **params: Any) -> NoReturn:
            state.use(redis_url, config_path, log_level, log_format, debug)
            sys.exit(run_guarded(lambda: fn(state, **params), state))

        command = group.command(name, **attrs)(run)
        # Added to the built command, so that --help lists them after the command's own options.
        for option in global_options():
            option(command)
        return command

    return decorate


class QuietCommand(click.Command):
    """A click command that stops quietly, exit 0, when its output is closed (click itself
    would exit 1), also while it writes its --help."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except BrokenPipeError:
            output_closed()

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            output_closed()


class OneLineErrors(QuietCommand, click.Group):
    """A click group whose usage errors are one line (``jobq: error: ...``), exit code 2, and
    whose commands stop quietly when their output is closed (see :class:`QuietCommand`)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        # standalone_mode is in click's signature only: one_line_errors always handles the errors
        return one_line_errors(super().main, args, prog_name or "jobq",
                               complete_var=complete_var, **extra)


def one_line_errors(run: Callable[..., Any], args: Any, prog_name: str, **extra: Any) -> Any:
    """Run a click entry point; show usage errors as one line instead of click's block."""
    try:
        return run(args=args, prog_name=prog_name, standalone_mode=False, **extra)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else prog_name
        click.echo(f"{prog_name}: error: {exc.format_message()} (see '{command} --help')",
                   err=True)
        sys.exit(exitcodes.USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo(f"{prog_name}: aborted", err=True)
        sys.exit(exitcodes.FAILURE)


def _with_global_options(fn: _Decorated) -> _Decorated:
    for option in reversed(global_options()):  # a function's decorators apply bottom-up
        fn = option(fn)
    return fn


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@_with_global_options
@click.version_option(package_name="jobq")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, config_path: str | None,
         log_level: str | None, log_format: str | None, debug: bool) -> None:
    """jobq: a durable Redis job queue with a pre-fork master."""
    ctx.obj = State(redis_url, config_path, debug, log_level, log_format)
