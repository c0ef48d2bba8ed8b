"""``python -m expertplane.controller.operator ...`` = ``expertplane operator ...``."""

import sys

from expertplane.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main(["operator", *sys.argv[1:]]))
