"""hyperlaw server."""
