"""Retention: which recordings exist, which must stay and why, and deleting the rest safely."""
