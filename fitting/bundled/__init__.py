"""Data files shipped with hyperlaw (see CITATION.md)."""
