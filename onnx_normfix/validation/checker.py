"""onnx.checker on a stage, with what the INPUT already failed set aside.

A model onnxruntime runs is a model the tool accepts: what the checker objects to in the
input (a graph input or output declared without a shape, another finding onnxruntime does
not mind) is a note, and later stages are checked only for new findings (`CheckPolicy`).
A pass that makes the checker fail is still a validation failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..model_io import _first_line
from .worker import Staged

MISSING_SHAPE = "Field 'shape' of 'type' is required but missing"


@dataclass(frozen=True)
class CheckPolicy:
    """How stages are checked (truthy: full check): what onnx.checker found wrong with the
    INPUT is not held against a pass. `shapeless`: main-graph inputs/outputs the input
    declares without a shape (checked as if shaped); `tolerated`: the input's own finding."""

    full: bool
    shapeless: frozenset = frozenset()
    tolerated: str | None = None

    def __bool__(self) -> bool:
        return self.full


def shapeless_io(source: bytes | Staged) -> frozenset:
    graph = _light_model(source).graph
    return frozenset(vi.name for vi in [*graph.input, *graph.output]
                     if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape"))


def _light_model(source: bytes | Staged) -> onnx.ModelProto:
    if isinstance(source, Staged):
        return onnx.load(source.path, load_external_data=False)
    return onnx.ModelProto.FromString(source)


def run_checker(source: bytes | Staged, full_check: bool | CheckPolicy = False) -> None:
    """onnx.checker on a model's bytes or its staged copy, under `full_check` (a bool or a
    `CheckPolicy`); raises what the checker raises for a finding the policy does not allow."""
    policy = full_check if isinstance(full_check, CheckPolicy) else CheckPolicy(bool(full_check))
    try:
        if isinstance(source, Staged):
            source.check(policy.full)
        else:
            onnx.checker.check_model(source, full_check=policy.full)
    except Exception as exc:
        finding = _first_line(exc)
        if policy.tolerated is not None and finding == policy.tolerated:
            return
        if not (policy.shapeless and MISSING_SHAPE in finding):
            raise
        view = _light_model(source)  # the input's shapeless inputs/outputs, given an empty shape
        for vi in [*view.graph.input, *view.graph.output]:
            if vi.name in policy.shapeless and vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape"):
                vi.type.tensor_type.shape.SetInParent()
        try:
            onnx.checker.check_model(view)
        except Exception as again:
            if policy.tolerated is not None and _first_line(again) == policy.tolerated:
                return
            raise
