"""viser viewer."""
