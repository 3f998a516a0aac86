"""The parts of ``benchmarks/serving.py``: the servers it starts, the load it sends, where the latency tail
comes from, and the report.

Imported by the script (which puts this folder after the project's packages on ``sys.path``) and by its tests.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The entry point: its hidden --_peer and --_load flags run the peer server and the Python load generator.
SCRIPT = Path(__file__).resolve().parents[1] / "serving.py"
MODEL_NAME = "digits"
