"""The monitor step: drift of served traffic against the training-time references."""

import os

# Evidently phones home unless told not to. Every module here imports it lazily, after this ran.
os.environ.setdefault("DO_NOT_TRACK", "1")
