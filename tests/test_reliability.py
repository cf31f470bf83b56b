"""Hostile and broken inputs through the real command line (`python -m onnx_normfix`).

Every bad model file must give: exit code 2, exactly one `onnx-normfix: error:` line on
stderr (no traceback), no output file (nor any temporary left in the output folder), and
the input folder byte-for-byte unchanged. External data that points outside the model's
folder must be refused *before it is opened*: those tests point it at a FIFO, which would
block the process (and fail the test on its timeout) if anything ever opened it.

Cases (each a row below): missing, empty, a folder, a FIFO, text, random bytes, protobufs
of other types, a nesting bomb, truncations at 20 offsets; dangling inputs, cycles,
duplicate names, unknown ops and domains, too-new opsets and IR, tensors whose data does
not match their shape or type; external data that is missing, short, misaligned with the
shape, or out of tree (`../../etc/passwd`, absolute, symlinks, in sparse initializers,
subgraphs and model-local functions). Twins that must keep working: external data inside
the folder (also through an in-folder symlink), and a declared custom domain.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_bn_model
from helpers import assert_close, ort_run

TIMEOUT = 60


# ---- harness -------------------------------------------------------------------------
def run_cli(*args, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_normfix", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under `folder` (symlinks and FIFOs are not followed)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p)] = f"mode:{p.lstat().st_mode:o}"
    return out


def error_line(stderr: str) -> str:
    """The single error line (progress lines start with '[')."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("onnx-normfix: error:"), stderr
    return lines[0]


@dataclass
class Case:
    """`build(folder)` writes a bad input under `folder / "in"` and returns the path to pass."""

    build: Callable[[Path], Path]
    needles: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()  # "{in}" is replaced by the case's input folder


@dataclass
class Outcome:
    proc: subprocess.CompletedProcess | None  # None: the tool hung
    before: dict
    after: dict
    out_files: list
    payload_ran: bool  # a pickle payload in the case touched folder/PWNED


CASES: dict[str, Case] = {}


def run_case(folder: Path, case: Case) -> Outcome:
    path = case.build(folder)
    before = tree_digest(folder / "in")
    out_dir = folder / "out"
    out_dir.mkdir()
    try:
        proc = run_cli(path, out_dir / "fixed.onnx", *(a.replace("{in}", str(folder / "in")) for a in case.extra))
    except subprocess.TimeoutExpired:
        proc = None
    return Outcome(proc, before, tree_digest(folder / "in"), sorted(p.name for p in out_dir.iterdir()),
                   (folder / "PWNED").exists())


def assert_refused(outcome: Outcome, needles=()) -> str:
    """The whole bad-input contract: exit 2, one error line, nothing written, input unchanged."""
    assert outcome.proc is not None, "the tool hung (did it open a FIFO outside the model's folder?)"
    line = error_line(outcome.proc.stderr)
    assert outcome.proc.returncode == 2, (outcome.proc.returncode, outcome.proc.stderr)
    for needle in needles:
        assert needle in line, (needle, line)
    assert outcome.out_files == [], "output or temporary written"
    assert outcome.after == outcome.before, "input folder changed"
    assert not outcome.payload_ran, "a pickle payload was executed"
    return line


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    """Every case of CASES, run through the CLI three at a time (each is a fresh process)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    names = sorted(CASES)
    with ThreadPoolExecutor(3) as pool:
        return dict(zip(names, pool.map(lambda n: run_case(root / n, CASES[n]), names)))


def model_bytes(edit=None, **kwargs) -> bytes:
    m = conv_bn_model(**kwargs)
    if edit is not None:
        edit(m)
    return m.SerializeToString()


def write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def tensor(m: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in m.graph.initializer if t.name == name)


def bytes_case(data: bytes, *needles: str, extra=()) -> Case:
    return Case(lambda folder: write(folder / "in", "model.onnx", data), needles, tuple(extra))


# ---- files that are not ONNX models ---------------------------------------------------
def _nesting_bomb(depth=200) -> bytes:
    """A ModelProto whose graph nests If subgraphs `depth` deep, written byte by byte
    (protobuf itself refuses to build it): recursion must end in a clean parse error."""
    def field(number, payload: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload
    graph = helper.make_graph([], "leaf", [], []).SerializeToString()
    for _ in range(depth):
        attr = field(1, b"then_branch") + field(6, graph) + _varint(20 << 3) + _varint(5)
        graph = field(1, field(4, b"If") + field(5, attr))
    opset = helper.make_opsetid("", 17).SerializeToString()
    return _varint(1 << 3) + _varint(8) + field(7, graph) + field(8, opset)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


NOT_ONNX = {
    "empty": (b"", "empty"),
    "text": (b"ir_version: 8\ngraph { node { op_type: 'Relu' } }\n", "not a valid ONNX"),
    "random_bytes_4k": (np.random.default_rng(0).bytes(4096), "not a valid ONNX"),
    "random_bytes_100": (np.random.default_rng(1).bytes(100), "not a valid ONNX"),
    "zeros": (bytes(1000), "not a valid ONNX"),
    "tensor_proto": (numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "t").SerializeToString(),
                     "not a valid ONNX"),
    "graph_proto": (conv_bn_model().graph.SerializeToString(), "not a valid ONNX"),
    "node_proto": (conv_bn_model().graph.node[0].SerializeToString(), "not a valid ONNX"),
    "nesting_bomb": (_nesting_bomb(), "not a valid ONNX"),
    # graph field claiming 2 GiB that the file does not have
    "length_bomb": (_varint(1 << 3) + _varint(8) + _varint(7 << 3 | 2) + _varint(1 << 31) + bytes(64), "not a valid ONNX"),
}
CASES.update({f"file_{name}": bytes_case(data, needle) for name, (data, needle) in NOT_ONNX.items()})
CASES["file_missing"] = Case(lambda folder: (folder / "in").mkdir(parents=True) or folder / "in" / "nope.onnx", ("not found",))


def _folder_input(folder: Path) -> Path:
    (folder / "in" / "dir.onnx").mkdir(parents=True)
    return folder / "in" / "dir.onnx"


def _fifo_input(folder: Path) -> Path:
    (folder / "in").mkdir(parents=True)
    os.mkfifo(folder / "in" / "pipe.onnx")  # reading it would block: the timeout catches that
    return folder / "in" / "pipe.onnx"


CASES["file_folder"] = Case(_folder_input, ("not a regular file",))
CASES["file_fifo"] = Case(_fifo_input, ("not a regular file",))

_GOOD = model_bytes()
TRUNCATIONS = sorted({1, 2, len(_GOOD) - 1, *np.linspace(3, len(_GOOD) - 2, 17).astype(int).tolist()})
CASES.update({f"truncated_at_{cut:04d}": bytes_case(_GOOD[:cut], "not a valid ONNX") for cut in TRUNCATIONS})


def test_truncation_offsets_are_spread():
    assert len(TRUNCATIONS) == 20 and TRUNCATIONS[0] == 1 and TRUNCATIONS[-1] == len(_GOOD) - 1


# ---- ONNX files with a broken graph ---------------------------------------------------
def _dangling(m):
    m.graph.node[0].input[0] = "nowhere"


def _cycle(m):  # Conv reads Relu's output, Relu reads BN, BN reads Conv
    m.graph.node.append(helper.make_node("Relu", ["bn_out"], ["back"]))
    m.graph.node[0].input[0] = "back"


def _dup_node_output(m):
    m.graph.node.append(helper.make_node("Relu", ["x"], ["bn_out"]))


def _dup_initializer(m):
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(4, np.float32), "bn.weight"))


def _dup_graph_input(m):
    m.graph.input.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]))


def _unknown_op(m):
    m.graph.node[-1].op_type = "Frobnicate"


def _undeclared_domain(m):
    m.graph.node[-1].domain = "com.nowhere"


def _opset(domain, version):
    def edit(m):
        if domain:
            m.opset_import.append(helper.make_opsetid(domain, version))
        else:
            m.opset_import[0].version = version
    return edit


def _ir(version):
    def edit(m):
        m.ir_version = version
    return edit


def _raw(name, delta):
    def edit(m):
        t = tensor(m, name)
        t.raw_data = t.raw_data[:delta] if delta < 0 else t.raw_data + bytes(delta)
    return edit


def _dims(name, dims):
    def edit(m):
        tensor(m, name).dims[:] = dims
    return edit


def _typed_data(n):
    def edit(m):
        t = tensor(m, "bn.weight")
        t.ClearField("raw_data")
        t.float_data.extend([1.0] * n)
    return edit


def _data_type(code):
    def edit(m):
        tensor(m, "bn.weight").data_type = code
    return edit


def _constant_short(m):
    bad = numpy_helper.from_array(np.ones(4, np.float32), "scale_const")
    bad.raw_data = bad.raw_data[:6]
    m.graph.node.insert(0, helper.make_node("Constant", [], ["scale_c"], value=bad))
    m.graph.node[2].input[1] = "scale_c"
    m.graph.initializer.remove(tensor(m, "bn.weight"))


def _input_elem_type(m):
    m.graph.input[0].type.tensor_type.elem_type = 999


def _shadow_initializer(m):  # Conv writes a tensor that is also an initializer
    m.graph.node[0].output[0] = m.graph.node[1].input[0] = "bn.bias"


def _no_outputs(m):
    del m.graph.output[:]


BROKEN = {
    "dangling_input": (_dangling, "nowhere"),
    "cycle": (_cycle, "cycle"),
    "duplicate_node_output": (_dup_node_output, "bn_out"),
    "duplicate_initializer": (_dup_initializer, "bn.weight"),
    "duplicate_graph_input": (_dup_graph_input, "'x'"),
    "unknown_op": (_unknown_op, "Frobnicate"),
    "undeclared_domain": (_undeclared_domain, "com.nowhere"),
    "opset_newer_than_onnx": (_opset("", onnx.defs.onnx_opset_version() + 1), "newer than the installed onnx"),
    "ml_opset_newer_than_onnx": (_opset("ai.onnx.ml", 99), "newer than the installed onnx"),
    "opset_zero": (_opset("", 0), "opset"),
    "ir_newer_than_onnx": (_ir(onnx.IR_VERSION + 5), "ir_version"),
    "raw_data_short": (_raw("conv.weight", -4), "conv.weight"),
    "raw_data_long": (_raw("bn.weight", 3), "bn.weight"),
    "raw_data_one_element_extra": (_raw("bn.bias", 4), "bn.bias"),
    "dims_huge": (_dims("conv.weight", [1 << 20, 1 << 20, 3, 3]), "conv.weight"),
    "dims_negative": (_dims("conv.weight", [-4, 3, 3, 3]), "conv.weight"),
    "dims_wrong_rank": (_dims("bn.weight", [2, 2]), None),
    "typed_data_short": (_typed_data(3), "bn.weight"),
    "typed_data_long": (_typed_data(5), "bn.weight"),
    "data_type_undefined": (_data_type(0), "bn.weight"),
    "data_type_unknown": (_data_type(999), "bn.weight"),
    "data_type_mismatch": (_data_type(TensorProto.DOUBLE), "bn.weight"),
    "constant_attribute_short": (_constant_short, "scale_const"),
    "input_element_type_unknown": (_input_elem_type, "'x'"),
    "no_graph_outputs": (_no_outputs, None),
    "no_nodes": (lambda m: m.graph.ClearField("node"), "'y'"),
    "unsorted_nodes": (lambda m: m.graph.node.reverse(), "earlier node"),
    "output_shadows_initializer": (_shadow_initializer, "assigned twice"),
}


CASES.update({f"graph_{name}": bytes_case(model_bytes(edit), *([needle] if needle else []))
              for name, (edit, needle) in BROKEN.items()})
# --no-validate skips onnxruntime, not the input checks
CASES.update({f"no_validate_{name}": bytes_case(model_bytes(BROKEN[name][0]), extra=["--no-validate"])
              for name in ("raw_data_long", "data_type_unknown", "opset_newer_than_onnx", "cycle", "dangling_input",
                 "duplicate_node_output")})


def test_declared_custom_domain_is_folded_and_reported_unvalidated(tmp_path):
    """Must-not-fire twin of the unknown-domain case: a custom op whose domain is declared
    is a valid model; fold_bn folds and the comparison is reported as skipped."""
    def custom(m):
        m.graph.node[-1].op_type, m.graph.node[-1].domain = "MyRelu", "com.example"
        m.opset_import.append(helper.make_opsetid("com.example", 1))
    path = write(tmp_path / "in", "model.onnx", model_bytes(custom))
    proc = run_cli(path, tmp_path / "fixed.onnx", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "validation skipped" in proc.stdout
    assert [n.op_type for n in onnx.load(tmp_path / "fixed.onnx").graph.node] == ["Conv", "MyRelu"]


# ---- external data ------------------------------------------------------------------
def _external(t: onnx.TensorProto, location: str, offset=0, length=None):
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    t.external_data.add(key="location", value=location)
    t.external_data.add(key="offset", value=str(offset))
    if length is not None:
        t.external_data.add(key="length", value=str(length))


def make_layout(folder: Path) -> tuple[Path, Path]:
    """folder/in/model/ (the model's folder: weights.bin, sub/weights.bin, symlinks that
    point out), folder/outside/ (a secret file and a FIFO that must never be opened)."""
    model_dir, outside = folder / "in" / "model", folder / "outside"
    (model_dir / "sub").mkdir(parents=True)
    outside.mkdir()
    weights = np.arange(64, dtype=np.float32).tobytes()
    for f in (model_dir / "weights.bin", model_dir / "sub" / "weights.bin", outside / "secret.bin"):
        f.write_bytes(weights)
    os.mkfifo(outside / "pipe")
    (model_dir / "link_pipe").symlink_to(outside / "pipe")
    (model_dir / "link_secret").symlink_to(outside / "secret.bin")
    (model_dir / "link_dir").symlink_to(outside, target_is_directory=True)
    (model_dir / "inner_link.bin").symlink_to(model_dir / "sub" / "weights.bin")
    return model_dir, outside


def _ext_model(model_dir: Path, location, offset=0, length=16, name="bn.weight") -> Path:
    m = conv_bn_model()
    _external(tensor(m, name), str(location), offset, length)
    return write(model_dir, "model.onnx", m.SerializeToString())


EXTERNAL_BAD = {
    # location ({outside}: the outside folder), offset, length, needle
    "missing_file": ("nope.bin", 0, 16, "file not found"),
    "dotdot_etc_passwd": ("../../../../../../../../etc/passwd", 0, 16, "relative path inside"),
    "absolute_etc_passwd": ("/etc/passwd", 0, 16, "relative path inside"),
    "dotdot_fifo": ("../../outside/pipe", 0, 16, "relative path inside"),
    "dotdot_in_the_middle": ("sub/../../../outside/pipe", 0, 16, "relative path inside"),
    "absolute_fifo": ("{outside}/pipe", 0, 16, "relative path inside"),
    "backslash_dotdot": ("..\\..\\outside\\pipe", 0, 16, "relative path inside"),
    "nul_byte": ("weights.bin\0../../outside/pipe", 0, 16, "relative path inside"),
    "empty_location": ("", 0, 16, "relative path inside"),
    "folder_itself": (".", 0, 16, None),
    "symlink_to_fifo": ("link_pipe", 0, 16, "outside the model's folder"),
    "symlink_to_secret": ("link_secret", 0, 16, "outside the model's folder"),
    "symlinked_folder": ("link_dir/pipe", 0, 16, "outside the model's folder"),
    # onnx refuses every symlinked data file, even one that stays inside the folder
    "symlink_inside": ("inner_link.bin", 0, 16, "symbolic link"),
    "location_is_a_folder": ("sub", 0, 16, "file not found"),
    "offset_past_end": ("weights.bin", 250, 16, "past the end"),
    "negative_offset": ("weights.bin", -16, 16, "past the end"),
    "offset_not_a_number": ("weights.bin", "0x10", 16, "not integers"),
    "length_not_matching_shape": ("weights.bin", 0, 20, "bn.weight"),
    "no_length_whole_file": ("weights.bin", 0, None, "bn.weight"),
}


def _external_case(location, offset, length) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        model_dir, outside = make_layout(folder)
        return _ext_model(model_dir, location.format(outside=outside), offset, length)
    return build


CASES.update({f"external_{name}": Case(_external_case(loc, off, length), (needle,) if needle else ())
              for name, (loc, off, length, needle) in EXTERNAL_BAD.items()})


def _flag_without_location(folder: Path) -> Path:
    model_dir, _ = make_layout(folder)
    m = conv_bn_model()
    tensor(m, "bn.weight").data_location = TensorProto.EXTERNAL
    return write(model_dir, "model.onnx", m.SerializeToString())


CASES["external_flag_without_location"] = Case(_flag_without_location, ("relative path inside",))


# onnx's own external-data walker skips sparse initializers and model-local functions; ours
# does not: each of these points at the FIFO outside and must be refused unopened.
def _sparse_outside(m):
    values = numpy_helper.from_array(np.ones(4, np.float32), "bn.weight")
    _external(values, "../../outside/pipe", 0, 16)
    m.graph.initializer.remove(tensor(m, "bn.weight"))
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, numpy_helper.from_array(np.arange(4), "i"), [4]))


def _function_outside(m):
    c = numpy_helper.from_array(np.ones(1, np.float32), "fn_const")
    _external(c, "../../outside/pipe", 0, 4)
    m.functions.append(helper.make_function(
        "local", "AddOne", ["a"], ["b"],
        [helper.make_node("Constant", [], ["one"], value=c), helper.make_node("Add", ["a", "one"], ["b"])],
        [helper.make_opsetid("", 17)]))
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.graph.node[-1].output[0] = "pre"
    m.graph.node.append(helper.make_node("AddOne", ["pre"], ["y"], domain="local"))


def _subgraph_outside(m):
    branch_w = numpy_helper.from_array(np.ones(1, np.float32), "branch_w")
    _external(branch_w, "../../outside/pipe", 0, 4)
    branch = helper.make_graph([helper.make_node("Add", ["bn_out", "branch_w"], ["z"])], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [branch_w])
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    m.graph.node[-1].input[0] = "branched"
    m.graph.node.insert(2, helper.make_node("If", ["cond"], ["branched"], then_branch=branch, else_branch=branch))


def _hidden_case(edit) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        model_dir, _ = make_layout(folder)
        return write(model_dir, "model.onnx", model_bytes(edit))
    return build


CASES.update({f"external_hidden_in_{name}": Case(_hidden_case(edit), ("relative path inside",))
              for name, edit in [("sparse_initializer", _sparse_outside), ("function", _function_outside),
                                 ("subgraph", _subgraph_outside)]})


# ---- bad data files: --inputs, --reference, --stats ------------------------------------
class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _evil_array(folder: Path) -> np.ndarray:
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = Payload(folder / "PWNED"), 1.0
    return arr


X = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)


def _with_data(writers: dict[str, Callable[[Path, Path], None]]) -> Callable[[Path], Path]:
    """A good model plus data files, each written by writer(path, case folder)."""
    def build(folder: Path) -> Path:
        path = write(folder / "in", "model.onnx", model_bytes())
        for name, writer in writers.items():
            writer(folder / "in" / name, folder)
        return path
    return build


def _npz(**arrays):
    def writer(path: Path, folder: Path):
        with open(path, "wb") as f:  # np.savez pickles object arrays by default: the attack
            np.savez(f, **{k: (v(folder) if callable(v) else v) for k, v in arrays.items()})
    return writer


def _raw(data_of: Callable[[Path], bytes]):
    def writer(path: Path, folder: Path):
        path.write_bytes(data_of(folder))
    return writer


def _truncated_npz(folder: Path) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=X)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _zip_member_not_npy(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.npy", pickle.dumps(Payload(folder / "PWNED")))
    return buf.getvalue()


def _pickle_file(folder: Path) -> bytes:
    return pickle.dumps({"state_dict": {"in.running_mean": Payload(folder / "PWNED")}})


def _torch_file(folder: Path) -> bytes:
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({"state_dict": {"in.running_mean": Payload(folder / "PWNED")}}, buf)
    return buf.getvalue()


DATA_CASES = {
    # name: (files, extra args, needle)
    "inputs_object_array": ({"x.npz": _npz(x=_evil_array)}, ["--inputs", "{in}/x.npz"], "allow_pickle"),
    "reference_object_array": ({"x.npz": _npz(x=X), "ref.npz": _npz(y=_evil_array)},
                               ["--inputs", "{in}/x.npz", "--reference", "{in}/ref.npz"], "allow_pickle"),
    "inputs_truncated_zip": ({"x.npz": _raw(_truncated_npz)}, ["--inputs", "{in}/x.npz"], "--inputs"),
    "inputs_random_bytes": ({"x.npz": _raw(lambda f: np.random.default_rng(2).bytes(300))}, ["--inputs", "{in}/x.npz"],
                            "--inputs"),
    "inputs_pickle_as_npz": ({"x.npz": _raw(_pickle_file)}, ["--inputs", "{in}/x.npz"], "--inputs"),
    "inputs_zip_member_is_a_pickle": ({"x.npz": _raw(_zip_member_not_npy)}, ["--inputs", "{in}/x.npz"], None),
    "inputs_plain_npy": ({"x.npy": lambda p, f: np.save(p, X)}, ["--inputs", "{in}/x.npy"], "--inputs"),
    "inputs_missing": ({}, ["--inputs", "{in}/none.npz"], "not found"),
    "inputs_wrong_shape": ({"x.npz": _npz(x=np.ones((2, 5, 8, 8), np.float32))}, ["--inputs", "{in}/x.npz"], None),
    "inputs_wrong_rank": ({"x.npz": _npz(x=np.ones((3, 8, 8), np.float32))}, ["--inputs", "{in}/x.npz"], None),
    "inputs_wrong_dtype": ({"x.npz": _npz(x=X.astype(np.float64))}, ["--inputs", "{in}/x.npz"], None),
    "inputs_unknown_name": ({"x.npz": _npz(x=X, z=X)}, ["--inputs", "{in}/x.npz"], "z"),
    "reference_truncated_zip": ({"x.npz": _npz(x=X), "ref.npz": _raw(_truncated_npz)},
                                ["--inputs", "{in}/x.npz", "--reference", "{in}/ref.npz"], "--reference"),
    "stats_plain_pickle_payload": ({"evil.pt": _raw(_pickle_file)}, ["--passes", "fix_inorm", "--stats", "{in}/evil.pt"],
                                   "evil.pt"),
    "stats_torch_save_payload": ({"evil.pt": _raw(_torch_file)}, ["--passes", "fix_inorm", "--stats", "{in}/evil.pt"],
                                 "evil.pt"),
}
CASES.update({f"data_{name}": Case(_with_data(files), (needle,) if needle else (), tuple(extra))
              for name, (files, extra, needle) in DATA_CASES.items()})


def test_payloads_really_run_when_unpickled(tmp_path):
    """Guard against a vacuous test: the same payloads do create the marker when loaded
    the unsafe way, so the marker's absence above means 'refused', not 'harmless'."""
    _npz(x=_evil_array)(tmp_path / "x.npz", tmp_path)
    np.load(tmp_path / "x.npz", allow_pickle=True)["x"]
    assert (tmp_path / "PWNED").exists()
    (tmp_path / "PWNED").unlink()
    pickle.loads(_pickle_file(tmp_path))
    assert (tmp_path / "PWNED").exists()


# ---- every case above ------------------------------------------------------------------
KNOWN_GAPS: dict[str, str] = {
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_GAPS[n], strict=True))
                                  if n in KNOWN_GAPS else n for n in sorted(CASES)])
def test_bad_input_is_refused(outcomes, name):
    assert_refused(outcomes[name], CASES[name].needles)


def test_case_count():
    """The figure quoted in the report: how many bad inputs the suite tries."""
    assert len(CASES) >= 100, len(CASES)


def test_external_data_inside_the_folder_still_loads(tmp_path):
    """Must-not-fire twins: plain, in a subfolder, with './': folded, valid, same numbers."""
    model_dir, _ = make_layout(tmp_path)
    want = np.arange(4, 8, dtype=np.float32)  # bytes 16..31 of weights.bin
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    for location in ("weights.bin", "sub/weights.bin", "./sub/weights.bin"):
        path = _ext_model(model_dir, location, 16, 16, name="bn.bias")
        before = tree_digest(model_dir)
        out = tmp_path / "fixed.onnx"
        proc = run_cli(path, out, "-q")
        assert proc.returncode == 0, (location, proc.stderr)
        assert tree_digest(model_dir) == before
        m = onnx.load(out)
        onnx.checker.check_model(m, full_check=True)
        assert [n.op_type for n in m.graph.node] == ["Conv", "Relu"]
        src = onnx.load(path)  # with its external data
        assert np.array_equal(numpy_helper.to_array(tensor(src, "bn.bias")), want)
        assert_close(ort_run(m, {"x": x}), ort_run(src, {"x": x}))


# ---- the validator is never fooled -----------------------------------------------------
# (tests/test_pipeline.py covers: a negated weight on a one-output model, a changed second
# output, a broken pass after a random op, and a new uncontrolled random op.)
def multi_output_model() -> onnx.ModelProto:
    """x -> Conv_a -> BN_a -> Relu -> ya                  (float32)
         -> Conv_b -> BN_b -> Sigmoid -> yb               (float32)
         -> Conv_c -> BN_c -> Cast(fp16) -> yc            (float16)
         -> Flatten -> MatMul(W_d) -> BN_d -> yd          (float32, Linear + BatchNorm1d)"""
    rng = np.random.default_rng(7)
    inits, nodes = [], []

    def bn(tag, inp, out, c):
        for name, v in (("s", rng.uniform(0.5, 2, c)), ("b", rng.standard_normal(c)), ("m", rng.standard_normal(c)),
                        ("v", rng.uniform(0.2, 3, c))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{tag}.bn.{name}"))
        nodes.append(helper.make_node("BatchNormalization", [inp] + [f"{tag}.bn.{n}" for n in "sbmv"], [out]))

    for tag, tail in (("a", "Relu"), ("b", "Sigmoid"), ("c", "Cast")):
        inits.append(numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), f"{tag}.w"))
        nodes.append(helper.make_node("Conv", ["x", f"{tag}.w"], [f"{tag}.conv"], pads=[1, 1, 1, 1]))
        bn(tag, f"{tag}.conv", f"{tag}.bn", 4)
        extra = {"to": TensorProto.FLOAT16} if tail == "Cast" else {}
        nodes.append(helper.make_node(tail, [f"{tag}.bn"], [f"y{tag}"], **extra))
    inits.append(numpy_helper.from_array(rng.standard_normal((192, 5)).astype(np.float32), "d.w"))
    nodes += [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("MatMul", ["flat", "d.w"], ["d.mm"])]
    bn("d", "d.mm", "yd", 5)
    outputs = [helper.make_tensor_value_info("ya", TensorProto.FLOAT, [2, 4, 8, 8]),
               helper.make_tensor_value_info("yb", TensorProto.FLOAT, [2, 4, 8, 8]),
               helper.make_tensor_value_info("yc", TensorProto.FLOAT16, [2, 4, 8, 8]),
               helper.make_tensor_value_info("yd", TensorProto.FLOAT, [2, 5])]
    graph = helper.make_graph(nodes, "multi", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def temp_pass():
    from onnx_normfix.registry import PASSES

    added = []

    def add(name, run, preserves=True, order=90, options=None):
        from onnx_normfix import Pass, register_pass

        added.append(name)
        return register_pass(Pass(name, f"test pass {name}", preserves, run, order=order, options=options or {}))

    yield add
    for name in added:
        PASSES.pop(name, None)


def _wrong_fold(output: str, how: str):
    """fold_bn, then one mistake on the branch that computes `output`: the sign of one
    output channel of the folded weight, or of the folded bias."""
    from onnx_normfix.passes import fold_bn

    def run(model, ctx):
        result = fold_bn.PASS.run(model, ctx)
        folded = {"ya": "a.bn", "yb": "b.bn", "yc": "c.bn", "yd": "yd"}[output]  # the BN output names
        producer = next(n for n in model.graph.node if n.output[0] == folded)
        name = producer.input[1 if how == "weight" else 2]
        t = next(t for t in model.graph.initializer if t.name == name)
        value = numpy_helper.to_array(t).copy()
        if how == "weight":  # Conv: [Cout, ...]; Gemm from MatMul: [K, N] (transB=0) or [N, K]
            axis = 1 if producer.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in producer.attribute) else 0
            index = [slice(None)] * value.ndim
            index[axis] = 0
            value[tuple(index)] *= -1
        else:
            value[0] = -value[0]
        t.CopyFrom(numpy_helper.from_array(value, name))
        return result
    return run


@pytest.mark.parametrize("how", ["weight", "bias"])
@pytest.mark.parametrize("output", ["ya", "yb", "yc", "yd"])
def test_wrong_fold_is_caught_on_each_output(temp_pass, output, how):
    import onnx_normfix as nf

    temp_pass("wrong_fold", _wrong_fold(output, how), order=30)
    with pytest.raises(nf.ValidationError) as info:
        nf.optimize(multi_output_model(), passes=["wrong_fold"])
    assert info.value.stage == "wrong_fold"
    assert f"'{output}'" in str(info.value)
    bad = {name for name, e in info.value.details["outputs"].items() if not e["ok"]}
    assert bad == {output}, info.value.details["outputs"]


def test_right_fold_passes_on_every_output():
    """Twin of the above: the real fold on the same model passes, every output compared."""
    import onnx_normfix as nf

    v = nf.optimize(multi_output_model(), passes=["fold_bn"]).report["passes"][0]
    assert v["rewrites"] == 4 and v["validation"]["status"] == "passed"
    assert set(v["validation"]["outputs"]) == {"ya", "yb", "yc", "yd"}
    assert all(e["ok"] for e in v["validation"]["outputs"].values())


def _random_model() -> onnx.ModelProto:
    """x -> Conv -> BN -> bn_out ; y = bn_out + RandomNormalLike(bn_out) ; z = Relu(bn_out)"""
    model = conv_bn_model(with_relu=False)
    model.graph.node[-1].output[0] = "bn_out"
    model.graph.node.extend([
        helper.make_node("RandomNormalLike", ["bn_out"], ["noise"], name="/noise/RandomNormalLike"),
        helper.make_node("Add", ["bn_out", "noise"], ["y"], name="/add/Add"),
        helper.make_node("Relu", ["bn_out"], ["z"], name="/relu/Relu"),
    ])
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 8, 8]))
    return model


def _negate_conv_weight(model, ctx):
    from onnx_normfix import PassResult

    t = tensor(model, "conv.weight")
    t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
    return PassResult(rewrites=1)


def _edit_random_op(change: str):
    """A 'preserving' pass that changes the random op itself but keeps its output name."""
    def run(model, ctx):
        from onnx_normfix import PassResult

        node = next(n for n in model.graph.node if n.op_type == "RandomNormalLike")
        if change == "scale":
            node.attribute.append(helper.make_attribute("scale", 100.0))
        elif change == "mean":
            node.attribute.append(helper.make_attribute("mean", 3.0))
        else:
            node.op_type = "RandomUniformLike"
        return PassResult(rewrites=1)
    return run


@pytest.mark.parametrize("change", ["scale", "mean", "op_type"])
def test_changed_random_op_is_not_reported_equivalent(temp_pass, change):
    import onnx_normfix as nf

    temp_pass("edit_random", _edit_random_op(change))
    try:
        v = nf.optimize(_random_model(), passes=["edit_random"]).report["passes"][0]["validation"]
    except nf.ValidationError:
        return
    assert v["status"] != "passed", v


def test_wrong_noise_binding_is_ignored(temp_pass):
    """replace_random with an InputBinding that feeds the negated draws: the validator feeds
    noise made from the original op's attributes, never the binding, so the lie changes
    nothing (a wrong rewrite that the binding would hide: tests/test_mutations.py)."""
    import onnx_normfix as nf
    from onnx_normfix.passes import replace_random

    def lying(model, ctx):
        result = replace_random.PASS.run(model, ctx)
        for binding in result.input_bindings.values():
            make = binding.make_feed
            binding.make_feed = lambda captured, make=make: -make(captured)
        return result

    temp_pass("lying_binding", lying, order=10)
    v = nf.optimize(_random_model(), passes=["lying_binding"]).report["passes"][0]["validation"]
    assert v["status"] == "passed" and v["max_abs_diff"] == 0.0


def test_broken_pass_after_replace_random_is_caught_on_each_output(temp_pass):
    import onnx_normfix as nf

    temp_pass("negate_after", _negate_conv_weight)
    with pytest.raises(nf.ValidationError) as info:
        nf.optimize(_random_model(), passes=["replace_random", "negate_after"])
    assert info.value.stage == "negate_after"
    assert {n for n, e in info.value.details["outputs"].items() if not e["ok"]} == {"y", "z"}
    # twin: the real fold after replace_random passes on both outputs, compared on the draws
    rep = nf.optimize(_random_model(), passes=["replace_random", "fold_bn"]).report
    assert [p["validation"]["status"] for p in rep["passes"]] == ["passed", "passed"]
    assert rep["passes"][1]["validation"]["max_abs_diff"] < 1e-2  # [0, 255] draws: outputs ~1e3


@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_non_finite_inputs_do_not_hide_a_broken_pass(temp_pass, fill):
    import onnx_normfix as nf

    temp_pass("negate_nan", _negate_conv_weight)
    x = np.full((2, 3, 8, 8), fill, np.float32)
    try:
        v = nf.optimize(conv_bn_model(), passes=["negate_nan"], inputs={"x": x}).report["passes"][0]["validation"]
    except nf.NormfixError:
        return
    assert v["status"] != "passed", v
