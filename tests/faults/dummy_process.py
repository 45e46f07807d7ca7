"""A stand-in Procfile process for the supervisor's tests.

``python -m tests.faults.dummy_process serve``: prints ``ready <WORKER_ID> <pid>``,
then runs until SIGTERM (prints ``bye``, exits 0).  ``crash``: exits 3 at once.
``stubborn``: like ``serve`` but ignores SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import types


def main(mode: str) -> int:
    if mode == "crash":
        print("crashing", flush=True)
        return 3
    stopping = False

    def on_term(_signum: int, _frame: types.FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else on_term)
    print(f"ready {os.environ.get('WORKER_ID', '-')} {os.getpid()}", flush=True)
    while not stopping:
        signal.pause()
    print("bye", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
