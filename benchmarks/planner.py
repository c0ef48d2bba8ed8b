"""Benchmark 'planner' (being built)."""


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise OSError("benchmark planner is not built yet")
