"""A method that crashes for a reason that is not its configuration: its traceback must reach the user."""

from __future__ import annotations

from methods.lora import LoRA


class CrashingLoRA(LoRA):
    def prepare(self, model, ctx):
        raise RuntimeError("boom: a bug, not a configuration problem")
