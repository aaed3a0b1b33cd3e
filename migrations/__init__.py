"""Alembic migrations for the hyperlaw database (run with ``hyperlaw db upgrade``)."""
