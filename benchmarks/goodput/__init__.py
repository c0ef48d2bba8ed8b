"""``expertplane bench goodput``: a step-level simulation of an expert-parallel cluster comparing
rebalancing policies and their weight movers (see ``run``; the model is in docs/goodput.md)."""

from expertplane.benchmarks.goodput.run import add_arguments, run

__all__ = ["add_arguments", "run"]
