"""TensorFlow imported without its start-up banner.

Importing TensorFlow prints, from C++ before its logging is configured (so
TF_CPP_MIN_LOG_LEVEL cannot hide it), "WARNING: All log messages before
absl::InitializeLog() ..." and oneDNN's "custom operations are on" notice, twice (once per
library that loads). Runs that use TensorFlow only for TensorBoard summaries import it
here: file descriptor 2 is held while it loads and every other line is passed on.
"""

from __future__ import annotations

import os
import sys
import tempfile

BANNER = ("All log messages before absl::InitializeLog() is called",
          "oneDNN custom operations are on")


def import_tensorflow():
  """`import tensorflow` with the banner lines (`BANNER`) dropped from stderr; raises
  ImportError as the import does."""
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=import-outside-toplevel
      return tensorflow
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
              if not any(marker in line for marker in BANNER)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()
