"""Benchmark 'router' (being built)."""


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise OSError("benchmark router is not built yet")
