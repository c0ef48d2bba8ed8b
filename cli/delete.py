"""``expertplane delete placement NAME``: forget a placement on a running controller (its plans,
rollouts and load window); agents and workers keep serving the plan they have."""

from __future__ import annotations

from expertplane.cli.remote import add_remote_arguments


def register(sub) -> None:
    parser = sub.add_parser("delete", help="delete a placement from a running controller",
                            description=__doc__)
    parser.add_argument("kind", choices=("placement",), help="what to delete")
    parser.add_argument("name", metavar="NAME", help="placement name")
    parser.add_argument("--ignore-not-found", action="store_true",
                        help="succeed when the controller does not know NAME")
    add_remote_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from expertplane.cli.remote import Remote, RemoteError
    from expertplane.proto import expertplane_pb2 as pb

    with Remote(args) as remote:
        resp = remote.call(remote.plans, "DeletePlacement", pb.DeletePlacementRequest(placement=args.name))
    if resp.deleted:
        print(f"placement/{args.name} deleted")
    elif args.ignore_not_found:
        print(f"placement/{args.name} not found (nothing deleted)")
    else:
        raise RemoteError(f"placement {args.name!r} not found on {args.controller} "
                          "(--ignore-not-found to accept that)")
    return 0
