"""CLI flags built from the passes' own `Option` declarations (one argument group per pass),
and the loading of user passes (`--plugin`, entry points) before the parser is built.

cli.py names no pass: a pass registered by a plugin gets its flags, its --list-passes line
and its options exactly like the built-in ones.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from .errors import NormfixError
from .registry import PASSES, Option, Pass

ENTRY_POINT_GROUP = "onnx_normfix.passes"


def load_plugins(argv: list[str]) -> list[str]:
    """Import every `--plugin MODULE_OR_FILE.py` named in `argv` (they register passes) and
    the installed packages' `onnx_normfix.passes` entry points. Returns what was loaded."""
    loaded = []
    for spec in _plugin_args(argv):
        _import_plugin(spec)
        loaded.append(spec)
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as exc:
                raise NormfixError(f"cannot load pass plugin {ep.name!r} ({ep.value}): {exc}") from None
            loaded.append(ep.value)
    except ImportError:  # pragma: no cover (Python < 3.10)
        pass
    return loaded


def _plugin_args(argv: list[str]) -> list[str]:
    found = []
    for k, a in enumerate(argv):
        if a == "--plugin" and k + 1 < len(argv):
            found.append(argv[k + 1])
        elif a.startswith("--plugin="):
            found.append(a.split("=", 1)[1])
    return found


def _import_plugin(spec: str) -> None:
    path = Path(spec)
    try:
        if spec.endswith(".py") or path.is_file():
            if not path.is_file():
                raise NormfixError(f"--plugin {spec}: file not found")
            name = f"onnx_normfix_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except NormfixError:
        raise
    except Exception as exc:
        raise NormfixError(f"--plugin {spec}: cannot import it: {type(exc).__name__}: {exc}") from None


def add_pass_arguments(parser: argparse.ArgumentParser) -> None:
    """One argument group per registered pass, built from its options."""
    for p in PASSES.values():
        if not p.options:
            continue
        group = parser.add_argument_group(f"{p.name} options")
        for o in p.options:
            try:
                _add_option(group, p, o)
            except argparse.ArgumentError as exc:  # a flag the CLI itself has
                raise NormfixError(f"pass {p.name!r}: option {o.name!r} cannot have the flag {o.cli_flag}: {exc}") from None


def _add_option(group, p: Pass, o: Option) -> None:
    dest = _dest(p, o)
    help_ = o.help or f"option {o.name} of pass {p.name}"
    if o.type is bool:
        # a switch; the default stays the pass's (None = not given on the command line)
        group.add_argument(o.cli_flag, dest=dest, action="store_const", const=not bool(o.default), default=None,
                           help=help_)
        return
    kwargs = {"dest": dest, "default": None, "help": help_, "metavar": o.metavar or o.name.upper()}
    if o.repeatable:
        kwargs["action"] = "append"
    if o.choices:
        kwargs["choices"] = list(o.choices)
    if o.type is not None and o.type is not str:
        kwargs["type"] = o.type
    group.add_argument(o.cli_flag, **kwargs)


def _dest(p: Pass, o: Option) -> str:
    return f"pass__{p.name}__{o.name}"


def pass_options_from_args(args: argparse.Namespace, selected: set[str]) -> dict[str, dict]:
    """{pass name: {option: value}} for the flags given; a flag of a pass not in --passes is
    an error that names the pass."""
    out: dict[str, dict] = {}
    for p in PASSES.values():
        for o in p.options:
            value = getattr(args, _dest(p, o), None)
            if value is None:
                continue
            if p.name not in selected:
                raise NormfixError(f"{o.cli_flag} applies to pass {p.name}, which is not in --passes")
            out.setdefault(p.name, {})[o.name] = value
    return out


def file_arguments(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(flag, path) of every given pass option that names a file to read."""
    return [(o.cli_flag, getattr(args, _dest(p, o))) for p in PASSES.values() for o in p.options
            if o.file and getattr(args, _dest(p, o), None) is not None]
