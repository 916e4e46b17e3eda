"""User errors: how every entry point reports a mistake of the user's (a flag, a config field, a file, a row).

One rule for every command (`memagent <cmd>`, `python -m memagent_jax.<cmd>`): a user error prints ONE line,
`error: <message>` (the message names the field, flag, file or row at fault), and the command exits with status 2;
no traceback. `--debug` on the command line (any position; taken out before the command parses its flags) or
MEMAGENT_DEBUG=1 in the environment re-raises the error instead, with its traceback. Anything that is not a user
error (a bug) always keeps its traceback.

What counts as a user error: `UserError` and its subclasses, and `FileNotFoundError`. Every module's error class
for bad input derives from `UserError`: settings.SettingError (a bad value a settings dataclass refused) and
settings.ConfigError with every config error built on it (FlagError, AgentSettingsError, EvalConfigError,
TrainConfigError, PipelineConfigError), and bad weights, a checkpoint that cannot be restored, a malformed data file,
a bad mesh, a bad plan, bad server arguments, ... (`tests/test_faults_errors.py` checks each one).

    @errors.user_errors                        # argparse entry points: main(argv) -> exit status
    def main(argv=None) -> int: ...

    def main(argv):                            # absl entry points, inside main
        with errors.report_user_errors():
            run(...)

    errors.run_absl(main, define_flags, default_config="grpo")   # `python -m ...` and `memagent <cmd>`

`run_absl` also checks every `--config.a.b=value` override against the loaded config before absl parses the
flags (`check_config_overrides`): a typo is one line naming the flag, the config file and the nearest field.

This module imports nothing from the JAX side (absl and ml_collections only inside `run_absl` and the override
check).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence

USER_ERROR_STATUS = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "MEMAGENT_DEBUG"


class UserError(ValueError):
    """A mistake of the user's (a flag, a config field, a file, a row); the message names it. Entry points print
    it as one line and exit with status 2 (see the module docstring)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The user-error classes, for an `except` clause: `UserError` (every module's error class for bad input
    derives from it) and `FileNotFoundError`."""
    return (UserError, FileNotFoundError)


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, user_error_types())


def one_line(error: BaseException) -> str:
    """The error's message on one line (its lines joined; the exception's type when it has no message)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]  # str(KeyError) adds quotes
    return text or type(error).__name__


# ---------------------------------------------------------------------------------------------- --debug

_debug = False


def debug_requested() -> bool:
    """True when `--debug` was given to the running command or MEMAGENT_DEBUG is set (not '', '0' or 'false')."""
    return _debug or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def take_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """(`argv` without its `--debug` words, whether there was one). Words after a `--` are left alone."""
    out, found = [], False
    for i, word in enumerate(argv):
        if word == "--":
            out.extend(argv[i:])
            break
        if word == DEBUG_FLAG:
            found = True
            continue
        out.append(word)
    return out, found


@contextlib.contextmanager
def debugging(on: bool) -> Iterator[None]:
    """`debug_requested()` is True inside when `on` (restored after: in-process callers run commands in turn)."""
    global _debug
    before = _debug
    _debug = _debug or on
    try:
        yield
    finally:
        _debug = before


# ---------------------------------------------------------------------------------------------- reporting


def report(error: BaseException, status: int = USER_ERROR_STATUS) -> int:
    """Prints `error: <message>` on stderr; returns `status`."""
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    return status


def handle(error: BaseException, status: int = USER_ERROR_STATUS) -> int:
    """For an `except errors.user_error_types() as e:` clause: `report(e)` (one line, returns `status`), or, with
    --debug / MEMAGENT_DEBUG=1, `e` raised again with its traceback."""
    if debug_requested():
        raise error
    return report(error, status)


@contextlib.contextmanager
def report_user_errors(status: int = USER_ERROR_STATUS) -> Iterator[None]:
    """A user error raised inside becomes one line on stderr and `SystemExit(status)`; with --debug /
    MEMAGENT_DEBUG=1, and for any other exception, the exception goes on with its traceback."""
    try:
        yield
    except Exception as e:
        if debug_requested() or not is_user_error(e):
            raise
        raise SystemExit(report(e, status)) from None


def user_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Decorator for an entry point `main(argv=None) -> exit status`: takes `--debug` out of argv (of sys.argv when
    argv is None), and turns a user error into one line on stderr and the return value 2."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None, *args, **kwargs) -> int:
        if argv is None:
            rest, debug = take_debug_flag(sys.argv[1:])
            sys.argv[1:] = rest
        else:
            argv, debug = take_debug_flag(argv)
        with debugging(debug):
            try:
                return main(argv, *args, **kwargs)
            except Exception as e:
                if debug_requested() or not is_user_error(e):
                    raise
                return report(e)

    return wrapped


# ---------------------------------------------------------------------------------------------- config overrides


def config_flag_value(argv: Sequence[str], name: str = "config") -> str | None:
    """The value of `--config=X` or `--config X` in argv (None when absent)."""
    for i, word in enumerate(argv):
        if word.startswith(f"--{name}="):
            return word.split("=", 1)[1]
        if word == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _display(path: str) -> str:
    """A config path as the user knows it: the shipped recipes as configs/<name>.py."""
    from memagent_jax import configs

    file = path.split(":", 1)[0]
    if os.path.dirname(os.path.abspath(file)) == configs.FOLDER:
        return "configs/" + os.path.basename(file)
    return file


def _field_paths(config, prefix: str = "") -> list[str]:
    out = []
    for key in config.keys():
        value = config[key]
        out.append(prefix + key)
        if hasattr(value, "keys") and hasattr(value, "to_dict"):
            out.extend(_field_paths(value, f"{prefix}{key}."))
    return out


def load_config(path: str, name: str = "config"):
    """The ConfigDict of a `--config FILE[:ARG]` value, as ml_collections' config flag loads it; ConfigError naming
    --config when the file is missing or its get_config refuses the argument."""
    from memagent_jax import configs, settings

    path = configs.resolve(path)
    file = path.split(":", 1)[0]
    if not os.path.isfile(file):
        raise settings.ConfigError(f"--{name} {path}: no such file")
    file, sep, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location(f"_memagent_checked_{name}_config", file)
    if spec is None or spec.loader is None:
        raise settings.ConfigError(f"--{name} {path}: not a Python config file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config(arg) if sep else module.get_config()
    except (TypeError, ValueError, KeyError, AttributeError, ImportError, SyntaxError) as e:  # the config's own error
        raise settings.ConfigError(f"--{name} {path}: {type(e).__name__}: {one_line(e)}") from None


def config_overrides(argv: Sequence[str], name: str = "config") -> list[str]:
    """The dotted field names of the `--config.a.b=value` / `--config.a.b value` / `--[no]config.flag` overrides."""
    pattern = re.compile(rf"^--?(no)?{re.escape(name)}\.([^=\s]+)")
    out = []
    for word in argv:
        if word == "--":
            break
        m = pattern.match(word)
        if m:
            out.append(m.group(2))
    return out


def check_config_overrides(argv: Sequence[str], default_config: str | None = None, *, name: str = "config") -> None:
    """ConfigError when a `--config.a.b` override names no field of the config that `argv`'s --config (else
    `default_config`, a shipped recipe name or a path) loads: `--config.rl.learnig_rate: no such field in
    configs/grpo.py (did you mean rl.learning_rate?)`. Also ConfigError when the config file itself cannot load."""
    from memagent_jax import configs, settings

    overrides = config_overrides(argv, name)
    path = config_flag_value(argv, name)
    if path is None:
        if not default_config or not overrides:
            return
        path = default_config if os.path.isfile(default_config.split(":", 1)[0]) else configs.path_of(default_config)
    config = load_config(path, name)  # a missing file or a refused :arg is named here, before absl sees it
    if not hasattr(config, "keys"):
        return
    known = _field_paths(config)
    for field in overrides:
        node, parts = config, field.split(".")
        for depth, part in enumerate(parts):
            is_section = hasattr(node, "keys") and hasattr(node, "to_dict")
            if is_section and part in node.keys():
                node = node[part]
                continue
            where = ".".join(parts[:depth])
            if not is_section:
                reason = f"{where} is a value, not a section"
            else:
                reason = "no such field"
            guess = difflib.get_close_matches(field, known, n=1, cutoff=0.6) if is_section else []
            if not guess and is_section:
                guess = [
                    (where + "." if where else "") + g
                    for g in difflib.get_close_matches(part, list(node.keys()), n=1, cutoff=0.6)
                ]
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            raise settings.ConfigError(f"--{name}.{field}: {reason} in {_display(path)}{hint}")


# ---------------------------------------------------------------------------------------------- absl entry points


def flag_error_message(error: BaseException) -> str:
    """One line for an error absl / ml_collections raised while parsing flags."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # config_flags wraps a config's own error
        lines = [lines[0].rstrip(":"), lines[-1]]
    return " ".join(lines) or type(error).__name__


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing for `app.run(..., flags_parser=parse_flags)`: a bad flag value or unknown flag is one
    line naming it and exit status 2 (absl's own parser prints two lines and exits 1)."""
    from absl import flags

    try:
        return flags.FLAGS(list(argv))
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError) as e:
        if debug_requested():
            raise
        print(f"error: {flag_error_message(e)}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_STATUS) from None


def run_absl(
    main: Callable, define_flags: Callable[[], None], *, default_config: str, argv: Sequence[str] | None = None
) -> None:
    """Runs an absl entry point (`define_flags()`, then `app.run(main)`) with the shared user-error rules: `--debug`
    taken out of argv, the `--config.*` overrides checked against the config first, flag errors as one line, and
    exit status 2 for every user error. argv: the full command line (argv[0] the program; default sys.argv).
    Ends with SystemExit (absl's app.run), like the command would."""
    from absl import app, flags

    argv, debug = take_debug_flag(list(sys.argv if argv is None else argv))
    sys.argv = argv
    with debugging(debug):
        with report_user_errors():
            try:
                check_config_overrides(argv[1:], default_config)
                define_flags()  # ml_collections loads the default config (and its overrides) here
            except flags.Error as e:
                if debug_requested():
                    raise
                raise SystemExit(report(UserError(flag_error_message(e)))) from None
        app.run(main, flags_parser=parse_flags)
