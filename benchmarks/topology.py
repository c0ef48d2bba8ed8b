"""Benchmark 'topology' (being built)."""


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise OSError("benchmark topology is not built yet")
