"""Benchmark 'kernels' (being built)."""


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise OSError("benchmark kernels is not built yet")
