"""The hyperlaw client: the API's JSON wire format and a small REST client for it.

It imports nothing else of hyperlaw (httpx is its only dependency), so a training loop, the
trainer or a notebook can talk to the service without the server's packages.

>>> from client import HyperlawClient
"""

from client.rest import DEFAULT_URL, HyperlawAPIError, HyperlawClient, HyperlawUnavailable

__all__ = ["DEFAULT_URL", "HyperlawAPIError", "HyperlawClient", "HyperlawUnavailable"]
