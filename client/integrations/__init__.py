"""Callbacks that log a framework's training run to hyperlaw through ``hyperlaw.init``.

One module per framework, each importing its framework only inside itself (``import
client.integrations`` imports none of them):

- :mod:`client.integrations.huggingface`: ``HyperlawCallback``, a ``transformers``
  ``TrainerCallback`` (``pip install transformers``).
- :mod:`client.integrations.lightning`: ``HyperlawLogger``, a PyTorch Lightning ``Logger``
  (``pip install lightning``, or ``pytorch-lightning``).
- :mod:`client.integrations.ray_tune`: ``HyperlawTuneCallback``, a ``ray.tune.Callback`` that
  makes one hyperlaw run per Tune trial (``pip install "ray[tune]"``).

:mod:`client.integrations.common` holds what they share: N counted from a torch model, a
framework's metrics as the service's point columns.
"""
