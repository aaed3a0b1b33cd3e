"""hyperlaw: learning rate, batch size and critical batch size for LLM pre-training.

This package is the top of the tree: the ``hyperlaw`` command (:mod:`hyperlaw.cli`), which
assembles the commands of ``server``, ``fitting``, ``trainer`` and ``client``; and
``hyperlaw.init``, the light client's entry point for logging a run from your own training
loop (:mod:`client.run`; imported on first use, so ``import hyperlaw`` stays cheap).
"""

from __future__ import annotations

from typing import Any

__all__ = ["init"]


def __getattr__(name: str) -> Any:
    if name == "init":
        from client.run import init

        return init
    raise AttributeError(f"module 'hyperlaw' has no attribute {name!r}")
