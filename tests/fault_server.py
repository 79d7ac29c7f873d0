"""`loraserve serve` with one fault injected, for the failure-isolation tests.

Run as `python tests/fault_server.py serve ...` with LORASERVE_FAULT set:

- `execute:TEXT`: the executor raises on every step that computes a request
  whose prompt contains TEXT (the engine must fail that request alone);
- `loop:TEXT`: the engine step itself raises once such a request runs (the
  engine loop dies: /health turns 503 and the process exits non-zero); steps
  take at least 20 ms, so a long request is still running by then;
- `hold:TEXT`: such a request, once validated, is held (its file
  $LORASERVE_FAULT_MARK written) until its adapter has been unloaded; then it
  is queued, so an unload lands between validation and queueing.

The faults wrap the real classes; nothing else changes.
"""

from __future__ import annotations

import os
import sys
import time

from loraserve import cli
from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.torch_executor import TorchExecutor

KIND, _, TEXT = os.environ["LORASERVE_FAULT"].partition(":")
POISONED: set[str] = set()
"""Ids of the requests whose prompt contains TEXT."""

_make_request, _execute, _step = LLMEngine.make_request, TorchExecutor.execute, LLMEngine.step


def make_request(self, prompt, *args, **kwargs):
    req = _make_request(self, prompt, *args, **kwargs)
    if isinstance(prompt, str) and TEXT in prompt:
        POISONED.add(req.request_id)
        if KIND == "hold":  # on the validation worker thread: the engine loop runs on
            open(os.environ["LORASERVE_FAULT_MARK"], "w").close()
            deadline = time.monotonic() + 60
            while self.adapter_loaded(req.adapter) and time.monotonic() < deadline:
                time.sleep(0.01)
    return req


def execute(self, plan):
    if KIND == "execute" and any(q.request_id in POISONED for q in plan.seqs):
        raise RuntimeError("injected executor fault")
    return _execute(self, plan)


def step(self):
    if KIND == "loop":
        if any(r.request_id in POISONED for r in self.scheduler.running):
            raise RuntimeError("injected engine loop fault")
        time.sleep(0.02)  # a slow model: a long request is still running when the fault comes
    return _step(self)


LLMEngine.make_request, TorchExecutor.execute, LLMEngine.step = make_request, execute, step

if __name__ == "__main__":
    sys.exit(cli.main())
