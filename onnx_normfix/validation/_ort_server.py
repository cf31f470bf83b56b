"""The onnxruntime side of `validation.worker.OrtWorker`, run as a child process by file path.

A model can crash onnxruntime itself (a segfault, seen with BN-9 declaring empty optional
outputs); in a child process that costs one session, not the tool. Protocol on stdin/stdout:
8-byte little-endian length + pickle, request `(model bytes or path, feeds)`, reply
`(kind, payload)` with kind "ok" ({output: array}), "unavailable" (session creation failed)
or "failed" (run failed). `feeds` may be a list of feed dicts (several draws): they all run in
one session and the payload is a list of output dicts. This file imports only numpy and onnxruntime: it starts fast.
"""

import pickle
import struct
import sys


def _read(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def _write(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def _first_line(exc: BaseException) -> str:
    """onnxruntime's whole message on one line: its later lines hold the facts (e.g.
    `index: 1 Got: 4 Expected: 3`)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."


def serve(inp, out) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    # prepacked MatMul/Gemm weights are a second copy of them (+0.75 GiB on a 2.25 GiB model);
    # both stages run with the same setting, so the comparison is unaffected
    so.add_session_config_entry("session.disable_prepacking", "1")
    last_source, sess = None, None
    while True:
        request = _read(inp)
        if request is None:
            return
        source, feeds = request
        if source != last_source:  # the same model again (calibration batches): reuse its session
            last_source, sess = None, None
            try:
                sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
            except Exception as exc:
                _write(out, ("unavailable", _first_line(exc)))
                continue
            last_source = source
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name for i in sess.get_inputs()}
        many = isinstance(feeds, list)
        results, failed = [], None
        for k, feed in enumerate(feeds if many else [feeds]):
            try:
                values = sess.run(names, {n: v for n, v in feed.items() if n in wanted})
            except Exception as exc:
                failed = (f"draw {k}: " if many and k else "") + _first_line(exc)
                break
            results.append(dict(zip(names, values)))
        if not isinstance(source, bytes) or len(source) > (256 << 20):
            last_source, sess = None, None  # a big model's session is not kept between requests
        if failed is not None:
            _write(out, ("failed", failed))
            continue
        _write(out, ("ok", results if many else results[0]))


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
