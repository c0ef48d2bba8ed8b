"""Benchmarks behind ``expertplane bench <name>``; each module has ``add_arguments`` and ``run``.

Every benchmark measures ratios against a baseline in the same run and prints the command,
the machine and the numbers so they can be pasted into BENCHMARKS.md.
"""
