"""``expertplane apply -f FILE|DIR``: register or update placements on a running controller.

Reads the controller's placement YAML or ExpertPlacement custom resources (the same files
``kubectl apply -f`` and ``expertplane controller --placements`` take; examples/placements/),
validates every document first, then applies them one by one. A new placement gets its initial
plan computed by the controller before the call returns. Documents of other kinds (a
PipelinePlan, a Kustomization) are skipped with a note.
"""

from __future__ import annotations

import argparse
import sys

from expertplane.cli.remote import add_remote_arguments


def register(sub) -> None:
    parser = sub.add_parser("apply", help="register or update placements from YAML files",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-f", "--filename", action="append", required=True, metavar="FILE|DIR",
                        help="a YAML file, or a folder of *.yaml/*.yml files (repeatable)")
    add_remote_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from expertplane.cli.remote import Remote
    from expertplane.controller.placement_files import read_placement_files

    found = [read_placement_files(path) for path in args.filename]
    for files in found:
        for note in files.skipped:
            print(f"note: {note}", file=sys.stderr)
    placements = [p for files in found for p in files.placements]
    if not placements:
        raise ValueError(f"-f {' '.join(args.filename)}: no placement found (a placement is a "
                         "YAML document of the controller's schema or an ExpertPlacement; "
                         "see examples/placements/)")
    with Remote(args) as remote:
        known = {st.spec.name for st in remote.placements()}
        for placement in placements:
            if placement.name not in known:
                print(f"placement/{placement.name}: computing the initial plan ...",
                      file=sys.stderr, flush=True)
            state = remote.call(remote.plans, "ApplyPlacement", placement)
            verb = "configured" if placement.name in known else "created"
            print(f"placement/{placement.name} {verb} (plan version {state.plan_version} in force)")
    return 0
