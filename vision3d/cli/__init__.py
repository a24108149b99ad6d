from __future__ import annotations

"""`vision3d <command>`: one module per command, each with an `Args` dataclass and `run(args)`."""


def pop_option(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """Take ``--flag VALUE`` / ``--flag=VALUE`` out of argv (options tyro does not own, e.g. ``--preset``).

    Returns ``(value, rest)``; value is ``None`` when the flag is absent. A flag without a value raises
    ``ValueError`` naming it. The last occurrence wins.
    """
    rest: list[str] = []
    value: str | None = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == flag or a.startswith(flag + "="):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value:
                raise ValueError(f"{flag} needs a value")
            i += 1 if "=" in a else 2
            continue
        rest.append(a)
        i += 1
    return value, rest
