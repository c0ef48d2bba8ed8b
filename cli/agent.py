"""``expertplane agent``: (being built; see the issue that owns it)."""


def register(sub) -> None:
    parser = sub.add_parser("agent", help="(under construction)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    raise OSError("expertplane agent is not built yet")
