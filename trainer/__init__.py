"""hyperlaw trainer."""
