"""hyperlaw: learning rate, batch size and critical batch size for LLM pre-training.

This package is the top of the tree: the ``hyperlaw`` command (:mod:`hyperlaw.cli`), which
assembles the commands of ``server``, ``fitting`` and ``trainer``.
"""
