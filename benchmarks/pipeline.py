"""Benchmark 'pipeline' (being built)."""


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise OSError("benchmark pipeline is not built yet")
