"""Small shared utilities: optional imports, atomic writes."""
