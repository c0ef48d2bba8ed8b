"""The ``expertplane`` command line."""
