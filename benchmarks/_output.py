"""Shared by the benchmark scripts: ``tee`` copies what a run prints into a file, so that the
raw output behind a README table can be committed beside it (``benchmarks/results/``)."""
from __future__ import annotations

import contextlib
import os
import sys


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def tee(path):
    """Everything printed inside the block also goes to ``path`` (nothing more when None)."""
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        saved, sys.stdout = sys.stdout, _Tee(sys.stdout, file)
        try:
            yield
        finally:
            sys.stdout = saved
