"""Storage: every table, its schema and migrations, and the only SQL in the project."""
