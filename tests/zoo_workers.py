"""Worker functions for the directory-mode tests: importable by spawned worker processes
without importing the test module (and onnxruntime, pytest) there."""

from __future__ import annotations

import os
import signal

from onnx_normfix import zoo


def dying_worker(conn):
    """A worker that is killed (as by the OOM killer) on one model and works on the others."""
    while True:
        task = conn.recv()
        if task is None:
            return
        if task["path"].startswith("die"):
            os.kill(os.getpid(), signal.SIGKILL)
        conn.send(zoo.run_model(task))


def sleepy_worker(conn):
    """A worker that hangs on one model (as onnxruntime on a pathological graph)."""
    import time

    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(("started", time.time()))  # the timeout counts from here, as in the real worker
        if task["path"].startswith("slow"):
            try:
                time.sleep(600)
            except KeyboardInterrupt:  # how the zoo stops a worker first
                return
        conn.send(zoo.run_model(task))
