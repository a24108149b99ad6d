"""`vision3d <command>`: one module per command, each with an `Args` dataclass and `run(args)`."""
