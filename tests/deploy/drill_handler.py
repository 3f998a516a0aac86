"""The rollout drills' faulty handler: the project's handler (serving/handler.py), packed into a real .mar, made
to fail on a share of the inputs or to be slow, as the model's ``metadata.json`` says under ``drill``:

* ``{"fail_share": 0.3}``: a batch fails (TorchServe answers 503) when it holds one of the failing images (the
  same images every time: by a hash of their pixels). The smoke test's requests are spared, so the fault
  reaches the live evidence, as a bug that only some production inputs trigger would.
* ``{"sleep_ms": 80}``: every batch takes that much longer.

TorchServe loads it like any handler; the worker reaches ``serving.handler`` on the server's PYTHONPATH."""

import hashlib
import time

from serving.handler import ImageClassifierHandler


class DrillHandler(ImageClassifierHandler):
    def initialize(self, context):
        super().initialize(context)
        self.drill = dict(self.metadata.get("drill") or {})

    def inference(self, data, *args, **kwargs):
        sleep_ms = float(self.drill.get("sleep_ms", 0))
        if sleep_ms:
            time.sleep(sleep_ms / 1000)
        share = float(self.drill.get("fail_share", 0))
        for row, image in enumerate(data if share else ()):
            if self.context is not None and self._request_source(self._valid[row]) == "smoke-test":
                continue
            if hashlib.sha256(image.cpu().numpy().tobytes()).digest()[0] < 256 * share:
                raise RuntimeError("drill: the challenger fails on this input")
        return super().inference(data, *args, **kwargs)
