"""C buffers (ctypes) created per session and kept in a dict that is never pruned."""

import ctypes
import threading

from benchmarks.leak_workloads._common import serve

LEAKS = True
DESCRIPTION = "ctypes string buffers per session, never freed"

_SESSIONS: dict[int, ctypes.Array[ctypes.c_char]] = {}


def handle(i: int) -> None:
    _SESSIONS[i] = ctypes.create_string_buffer(1500)  # LEAK-SITE


def run(stop: threading.Event) -> None:
    serve(stop, handle, interval=0.003)
