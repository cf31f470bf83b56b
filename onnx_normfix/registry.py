"""The pass registry: what a pass is, what it returns, and how users add their own.

A pass declares everything the rest of the tool needs to know about it:

    register_pass(Pass(
        name="fuse_gelu", summary="one line for --list-passes", preserves_outputs=True,
        run=run,                                   # run(model, ctx) -> PassResult
        options=[Option("approximate", False, bool, "use the tanh form")],
        creates={"Gelu"}, runs_after_creators_of={"Erf"}, runs_before={"fold_bn"},
    ))

- `options` become the pass's own CLI flag group (`--approximate`) and library keywords
  (`optimize(..., approximate=True)` or `optimize(..., fuse_gelu={"approximate": True})`);
  two passes can never silently share a flag: registering a clash is an error.
- Order is declared, never numbered: `runs_after` / `runs_before` name other passes, and
  `runs_after_creators_of` says "after every selected pass that `creates` these ops" (fold_bn
  runs after every pass that creates BatchNormalization, a user's pass included).
- `graph="graphsurgeon"`: `run(graph, ctx)` receives an `onnx_graphsurgeon.Graph`; the pass is
  imported/exported around that pass only (see `graphsurgeon_pass`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import onnx

from .errors import NormfixError


@dataclass
class InputBinding:
    """How the validator feeds a graph input that a pass created.

    `needs` names tensors of the previous stage's model; the validator exposes them as extra
    outputs, runs that model once, and calls `make_feed(captured)` with their values to get
    the new input's value. This is how a pass that turns a random draw into an input proves
    equivalence on what the original model really drew.
    """

    needs: tuple[str, ...]
    make_feed: Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class Declined:
    """A site a pass looked at and left alone, and why: `Declined("Conv output has 2 consumers")`.
    Site functions return it instead of a rewrite; `str()` gives the report note."""

    reason: str
    site: str = ""

    def __str__(self) -> str:
        return f"skipped {self.site}: {self.reason}" if self.site else self.reason

    def at(self, site: str) -> "Declined":
        return Declined(self.reason, site)


@dataclass
class PassResult:
    """What one pass changed."""

    rewrites: int = 0
    notes: list[str] = field(default_factory=list)
    # None: as the pass declares. True: this run changed outputs on purpose (e.g. restored
    # running stats); the validator then reports the size of the change instead of failing.
    changes_outputs: bool | None = None
    input_bindings: dict[str, InputBinding] = field(default_factory=dict)
    # Extra figures a pass wants in the report (e.g. how each norm matched its stats).
    details: dict[str, Any] = field(default_factory=dict)
    # Each rewrite site as (input tensor names, output tensor names), names that exist both
    # before and after the pass; lets the validator check large graphs site by site.
    sites: list[tuple[list[str], list[str]]] = field(default_factory=list)

    def decline(self, declined: Declined | str, site: str = "") -> None:
        """Record a site the pass left alone (a note in the report)."""
        if isinstance(declined, str):
            declined = Declined(declined, site)
        elif site:
            declined = declined.at(site)
        self.notes.append(str(declined))


@dataclass
class PassContext:
    """What a pass may read besides the model: its own options and a progress callback."""

    options: Mapping[str, Any]
    log: Callable[[str], None] = lambda message: None


_FLAG = re.compile(r"^--[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class Option:
    """One option of a pass: a library keyword and a CLI flag.

    `type` is `str`, `int`, `float` or `bool` (a bool option is a switch: `--flag`), or a
    callable that parses the CLI string; `choices` limits the values; `flag` defaults to
    `--name-with-dashes`; `metavar` names the value in --help; `file=True` marks a path the pass
    reads (checked before the model is loaded)."""

    name: str
    default: Any = None
    type: Callable[[str], Any] | type | None = None
    help: str = ""
    choices: tuple | None = None
    metavar: str | None = None
    flag: str | None = None
    # a path to a file the pass reads: the CLI checks it exists before the model is loaded
    file: bool = False
    # the flag may be given several times; the value is then a list
    repeatable: bool = False

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.name


def _as_options(options) -> tuple[Option, ...]:
    """Accept a sequence of `Option`s or the older mapping {name: default}."""
    if isinstance(options, Mapping):
        return tuple(Option(name, default, type(default) if default is not None else str)
                     for name, default in options.items())
    out = tuple(options)
    for o in out:
        if not isinstance(o, Option):
            raise NormfixError(f"pass options must be Option(...) entries, got {o!r}")
    return out


@dataclass(frozen=True)
class Pass:
    """A registered rewrite.

    `run(model, ctx)` rewrites `model` (an `onnx.ModelProto`) in place and returns a
    `PassResult`. It does no file I/O, runs no onnxruntime and prints nothing.
    `options`: `Option`s (or a mapping {name: default}); the pass sees its own in `ctx.options`.
    `runs_after`, `runs_before`: names of passes this one must follow / precede when both run.
    `creates`: op types this pass adds; `runs_after_creators_of`: op types whose creators must
    run first. `reads`: core options (say `inputs`, `reference`) the pass sees besides its own. `order` is a legacy tie-break only (lower first); prefer the declarations.
    `prepare(model, options)`, if given, runs in the pipeline before `run` and may read files
    (a checkpoint, calibration data); it returns the options `run` will see.
    `outputs_note`: how the pass treats outputs, in words, when "preserves outputs" is not the
    whole truth (shown by --list-passes).
    """

    name: str
    summary: str
    preserves_outputs: bool
    run: Callable[[Any, PassContext], Any]
    order: int = 100
    options: Sequence[Option] | Mapping[str, Any] = ()
    prepare: Callable[[onnx.ModelProto, dict], dict] | None = None
    runs_after: frozenset = frozenset()
    runs_before: frozenset = frozenset()
    creates: frozenset = frozenset()
    runs_after_creators_of: frozenset = frozenset()
    graph: str = "onnx"
    # core options (e.g. inputs, reference) the pass reads besides its own
    reads: frozenset = frozenset()
    # stages this pass brings with it, given its options: [(Pass, its options), ...]
    # (fuse_norms' target_opset brings the raise_opset conversion, validated as its own stage)
    brings: Callable[[dict], list] | None = None

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "options", _as_options(self.options))
        for name in ("runs_after", "runs_before", "creates", "runs_after_creators_of", "reads"):
            value = getattr(self, name)
            set_(self, name, frozenset([value] if isinstance(value, str) else value))
        if self.graph not in ("onnx", "graphsurgeon"):
            raise NormfixError(f"pass {self.name!r}: graph must be 'onnx' or 'graphsurgeon', not {self.graph!r}")

    @property
    def option_defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Run the pass on `model` in place, whatever graph representation it is written for."""
        if self.graph == "graphsurgeon":
            from ._gs import run_graphsurgeon

            return run_graphsurgeon(self, model, ctx)
        return self.run(model, ctx)
    # How the pass treats outputs, in words, when "preserves outputs"/"changes outputs" is
    # not the whole truth (a pass that changes them in some modes): --list-passes shows it.
    outputs_note: str | None = None


PASSES: dict[str, Pass] = {}
# Flags the pipeline owns (the CLI's core options); a pass option may not take them.
CORE_FLAGS = frozenset({"--passes", "--list-passes", "--no-validate", "--full-validation", "--rtol", "--atol",
                        "--input-shape", "--inputs", "--reference", "--seed", "--report", "--quiet", "--verbose",
                        "--debug", "--version", "--help"})


def register_pass(p: Pass, *, replace: bool = False) -> Pass:
    """Register `p` under `p.name`; the CLI and `optimize` then accept that name."""
    if not p.name or not p.name.replace("_", "").isalnum():
        raise NormfixError(f"invalid pass name {p.name!r}: use letters, digits and '_'")
    if p.name in PASSES and not replace:
        raise NormfixError(f"a pass named {p.name!r} is already registered")
    for o in p.options:
        if not _FLAG.match(o.cli_flag):
            raise NormfixError(f"pass {p.name!r}: option {o.name!r} has an invalid flag {o.cli_flag!r}")
        if o.cli_flag in CORE_FLAGS:
            raise NormfixError(f"pass {p.name!r}: option {o.name!r} would take the core flag {o.cli_flag}")
        for other in PASSES.values():
            if other.name == p.name:
                continue
            clash = other.option(o.name)
            if clash is not None or any(x.cli_flag == o.cli_flag for x in other.options):
                raise NormfixError(f"pass {p.name!r}: option {o.name!r} ({o.cli_flag}) is already an option of "
                                   f"pass {other.name!r}; give it another name or flag")
    PASSES[p.name] = p
    return p


def canonical_pass_name(name: str) -> str:
    """`fold-bn`, `FOLD_BN` and ` fold_bn ` all name fold_bn (a registered name as typed wins)."""
    name = name.strip()
    if name in PASSES:
        return name
    key = name.lower().replace("-", "_")
    return next((p for p in PASSES if p.lower().replace("-", "_") == key), name)


def resolve_passes(names) -> list[Pass]:
    """Turn names (a list or a comma string) into passes, in pipeline order."""
    if isinstance(names, str):
        names = names.split(",")
    wanted: list[Pass] = []
    for raw in names:
        if isinstance(raw, Pass):
            if raw not in wanted:
                wanted.append(raw)
            continue
        name = canonical_pass_name(raw) if isinstance(raw, str) else getattr(raw, "name", raw)
        if not name:
            continue
        if name not in PASSES:
            valid = ", ".join(sorted(PASSES))
            raise NormfixError(f"unknown pass {raw!r}; valid passes: {valid}")
        if PASSES[name] not in wanted:
            wanted.append(PASSES[name])
    if not wanted:
        raise NormfixError("no passes requested; valid passes: " + ", ".join(sorted(PASSES)))
    return order_passes(wanted)


def order_passes(passes: Iterable[Pass]) -> list[Pass]:
    """Topological order of `passes` under their declared constraints; ties broken by the
    legacy `order`, then registration order, so the result never depends on naming order."""
    passes = list(passes)
    rank = {name: k for k, name in enumerate(PASSES)}
    by_name = {p.name: p for p in passes}
    after: dict[str, set[str]] = {p.name: set() for p in passes}  # name -> passes that must run first
    for p in passes:
        after[p.name] |= {n for n in p.runs_after if n in by_name and n != p.name}
        for n in p.runs_before:
            if n in by_name and n != p.name:
                after[n].add(p.name)
        for q in passes:
            if q is not p and q.creates & p.runs_after_creators_of:
                after[p.name].add(q.name)
    done: list[Pass] = []
    left = {p.name for p in passes}
    key = lambda name: (by_name[name].order, rank.get(name, len(rank)), name)  # noqa: E731
    while left:
        ready = sorted((n for n in left if not (after[n] & left)), key=key)
        if not ready:
            cycle = ", ".join(sorted(left))
            raise NormfixError(f"passes {cycle} have contradictory order constraints (a cycle); "
                               "check their runs_after/runs_before/creates declarations")
        done.append(by_name[ready[0]])
        left.discard(ready[0])
    return done


def split_options(selected: Sequence[Pass], options: Mapping[str, Any], core: Mapping[str, Any]) -> tuple[dict, dict]:
    """Split user options into core options and per-pass options.

    Options may be given flat (`stats=...`, when exactly one selected pass declares `stats`)
    or namespaced (`fix_inorm={"stats": ...}`). Returns (core options, {pass name: options})
    with defaults filled in. Raises NormfixError for an unknown, ambiguous or unrequested name."""
    merged_core = dict(core)
    per_pass = {p.name: p.option_defaults for p in selected}
    selected_names = {p.name for p in selected}
    for key, value in options.items():
        if key in core:
            merged_core[key] = value
            continue
        canon = canonical_pass_name(key)
        if canon in PASSES and isinstance(value, Mapping):
            if canon not in selected_names:
                raise NormfixError(f"options given for pass {canon!r}, which was not requested")
            p = PASSES[canon]
            for name, v in value.items():
                if p.option(name) is None:
                    known = ", ".join(o.name for o in p.options) or "none"
                    raise NormfixError(f"pass {canon!r} has no option {name!r}; its options: {known}")
                per_pass[canon][name] = v
            continue
        owners = [p for p in selected if p.option(key) is not None]
        if len(owners) > 1:
            raise NormfixError(f"option {key!r} is declared by passes {', '.join(p.name for p in owners)}; "
                               f"say which: {owners[0].name}={{{key!r}: ...}}")
        if not owners:
            elsewhere = [p.name for p in PASSES.values() if p.option(key) is not None]
            if elsewhere:
                raise NormfixError(f"option {key!r} belongs to pass {elsewhere[0]!r}, which was not requested")
            known = sorted(set(core) | {o.name for p in selected for o in p.options})
            raise NormfixError(f"unknown option {key!r}; known: {', '.join(known)}")
        per_pass[owners[0].name][key] = value
    return merged_core, per_pass


def graphsurgeon_pass(name: str, summary: str, *, preserves_outputs: bool = True, register: bool = True,
                      **kwargs) -> Callable[[Callable], Pass]:
    """Decorator: a function over an `onnx_graphsurgeon.Graph` becomes a registered pass.

        @graphsurgeon_pass("drop_identity", "remove Identity nodes")
        def drop_identity(graph, ctx):
            ...                       # edit graph in place
            return n                  # rewrites (an int), a PassResult, or None

    The pipeline imports the model into graphsurgeon before the pass and exports it after
    (`cleanup().toposort()` included), so the pass gets the same validation, report and
    atomic save as the built-in ones; graphsurgeon is imported only then."""

    def wrap(fn: Callable) -> Pass:
        p = Pass(name=name, summary=summary, preserves_outputs=preserves_outputs, run=fn, graph="graphsurgeon", **kwargs)
        return register_pass(p) if register else p

    return wrap
