"""``expertplane controller``: (being built; see the issue that owns it)."""


def register(sub) -> None:
    parser = sub.add_parser("controller", help="(under construction)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    raise OSError("expertplane controller is not built yet")
