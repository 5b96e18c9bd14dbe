"""The `deflect` command's entry point.

Loading the CLI loads torch, seconds on a small machine. That happens here, inside a Ctrl-C
handler, so an interrupt at any moment ends as every other one does: one line, exit code 130, no
traceback.

An interrupted command leaves through `os._exit` once its line is out. An interrupt that lands
while torch's extension runs Python code of its own (an embedded eval) marks the interpreter, and a
normal exit then ends the process by SIGINT instead of with code 130, whatever the code asked for.
Everything deflect stores is committed before the line is printed, so skipping the interpreter's
teardown loses nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys

INTERRUPTED = 130


def main() -> None:
    try:
        from deflect.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        print("deflect: interrupted", file=sys.stderr)
        _leave(INTERRUPTED)
    except SystemExit as exc:
        if exc.code == INTERRUPTED:
            _leave(INTERRUPTED)
        raise


def _leave(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach it
            stream.flush()
    os._exit(code)
