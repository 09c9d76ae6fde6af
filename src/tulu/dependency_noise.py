"""Known harmless log lines of dependencies, hidden in tulu's command-line tools.

Importing PEFT imports torchao when it is installed (the ``train`` extra brings it, for the
bfloat16-state and 8-bit AdamW options), and torchao then logs a "Failed to load ....so"
warning for each of its CUDA kernel libraries that cannot load on this machine, and torch logs
deprecation warnings for the enums torchao registers. None of it concerns what tulu runs (its
torchao optimizers are Python compiled by torch.compile), but a user of ``tulu export`` or
``tulu chat ADAPTER`` sees four lines that look like failures. The commands raise those two
loggers to ERROR; the library itself (``import tulu``) leaves logging alone.
"""

from __future__ import annotations

import logging

__all__ = ["NOISY_LOGGERS", "quiet_dependency_noise"]

#: Loggers whose warnings say nothing about what tulu runs.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_dependency_noise() -> None:
    """Show only errors from `NOISY_LOGGERS` (call once, before PEFT or torchao is imported)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
