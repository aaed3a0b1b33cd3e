"""hyperlaw fitting."""
