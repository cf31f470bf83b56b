"""The pass registry: what a pass is, what it returns, and how users add their own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

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


@dataclass
class PassContext:
    """What a pass may read besides the model: its options and a progress callback."""

    options: Mapping[str, Any]
    log: Callable[[str], None] = lambda message: None


@dataclass(frozen=True)
class Pass:
    """A registered rewrite.

    `run(model, ctx)` rewrites `model` (an `onnx.ModelProto`) in place and returns a
    `PassResult`. It does no file I/O, runs no onnxruntime and prints nothing.
    `order` fixes where the pass runs in the pipeline whatever order the user names passes
    in: passes that create nodes run before the passes that simplify them.
    `options` are the keyword options the pass accepts, with their defaults.
    `prepare(model, options)`, if given, runs in the pipeline before `run` and may read files
    (a checkpoint, calibration data); it returns the options `run` will see.
    """

    name: str
    summary: str
    preserves_outputs: bool
    run: Callable[[onnx.ModelProto, PassContext], PassResult]
    order: int = 100
    options: Mapping[str, Any] = field(default_factory=dict)
    prepare: Callable[[onnx.ModelProto, dict], dict] | None = None
    # How the pass treats outputs, in words, when "preserves outputs"/"changes outputs" is
    # not the whole truth (a pass that changes them in some modes): --list-passes shows it.
    outputs_note: str | None = None


PASSES: dict[str, Pass] = {}


def register_pass(p: Pass, *, replace: bool = False) -> Pass:
    """Register `p` under `p.name`; the CLI and `optimize` then accept that name."""
    if not p.name or not p.name.replace("_", "").isalnum():
        raise NormfixError(f"invalid pass name {p.name!r}: use letters, digits and '_'")
    if p.name in PASSES and not replace:
        raise NormfixError(f"a pass named {p.name!r} is already registered")
    PASSES[p.name] = p
    return p


def resolve_passes(names) -> list[Pass]:
    """Turn names (a list or a comma string) into passes, in pipeline order."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    wanted = []
    for raw in names:
        name = raw.strip() if isinstance(raw, str) else getattr(raw, "name", raw)
        if isinstance(raw, Pass):
            wanted.append(raw)
            continue
        if not name:
            continue
        if name not in PASSES:
            valid = ", ".join(sorted(PASSES))
            raise NormfixError(f"unknown pass {name!r}; valid passes: {valid}")
        if PASSES[name] not in wanted:
            wanted.append(PASSES[name])
    if not wanted:
        raise NormfixError("no passes requested; valid passes: " + ", ".join(sorted(PASSES)))
    return sorted(wanted, key=lambda p: p.order)
