"""`python -m enclavefl`: the command line, as the launcher starts every party.

A finished command exits without the interpreter's teardown: unloading torch, grpc and
numpy takes seconds (far more on a loaded machine) after everything the command writes
is already on disk (files closed, results replaced atomically), and the launcher waits
for every party's exit. Logs and stdio are flushed first; the exit code is click's.
"""

import logging
import os
import sys

from enclavefl.cli import main


def _run() -> None:
    try:
        main()
        code = 0
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            code = done.code or 0
        else:  # what `sys.exit("message")` would print
            print(done.code, file=sys.stderr)
            code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":  # not when multiprocessing re-imports it as __mp_main__
    _run()
