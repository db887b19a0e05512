"""A command-line entry point's `main(argv)` run in the test process, for the families of
refusals whose every case goes through the same error handling in `main`: a new
interpreter per case costs seconds of imports, and one case of each family still runs in
a subprocess, which also shows what the interpreter itself prints."""

import contextlib
import io
import subprocess
import sys
from typing import Callable
from unittest import mock


def run_main(main: Callable[[list[str]], None], prog: str,
             argv: list[str]) -> subprocess.CompletedProcess:
  """`main(argv)` as `prog argv...` would run it: its exit status, stdout and stderr.

  As the interpreter does at exit, `sys.exit(message)` writes the message to stderr with
  status 1, and `sys.exit(None)` is status 0. `prog` is what argparse names the command
  (sys.argv[0] of a real run).
  """
  stdout, stderr = io.StringIO(), io.StringIO()
  status = 0
  with mock.patch.object(sys, "argv", [prog, *argv]), contextlib.redirect_stdout(stdout), \
      contextlib.redirect_stderr(stderr):
    try:
      main(argv)
    except SystemExit as exit:
      if isinstance(exit.code, int) or exit.code is None:
        status = exit.code or 0
      else:
        print(exit.code, file=sys.stderr)
        status = 1
  return subprocess.CompletedProcess([prog, *argv], status, stdout.getvalue(),
                                     stderr.getvalue())
