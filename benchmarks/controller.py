"""Benchmark 'controller' (being built)."""


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise OSError("benchmark controller is not built yet")
