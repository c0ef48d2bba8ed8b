"""Per-caller authorization of gRPC calls: who is calling (bearer token or mTLS certificate) and
whether one of the caller's roles allows the method.

A token file (``--token-file``, ``--local-token-file``) holds either one bearer token (any holder
may call every method, as before) or a callers file, YAML or JSON::

    own_token_file: /secrets/self        # optional: the token this process sends on its calls
    callers:
      - {name: agent-node1, token_sha256: <64 hex digits>, roles: [agent]}
      - {name: ops, token_file: /secrets/ops, roles: [admin]}
      - {name: node1-cert, identity: agent-node1, roles: [agent]}   # mTLS: certificate CN or SAN

A call carrying ``authorization: Bearer <token>`` is the caller whose token it is (compared as
SHA-256 digests in constant time); a call without one is the first caller whose ``identity`` is
the common name or a subject-alternative name of the verified client certificate. No caller:
UNAUTHENTICATED. A caller whose roles do not allow the method: PERMISSION_DENIED naming the caller
and the method. The token never appears in a message or a log line.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import inspect
import logging
import pathlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import grpc
import jsonschema
import yaml

from expertplane.proto import expertplane_pb2 as pb

log = logging.getLogger(__name__)

# Health checks and reflection stay reachable without credentials so that probes work.
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _all_methods() -> frozenset[str]:
    """Full method names (``/package.Service/Method``) of every service in the proto."""
    return frozenset(f"/{service.full_name}/{method.name}"
                     for service in pb.DESCRIPTOR.services_by_name.values()
                     for method in service.methods)


ALL_METHODS = _all_methods()


def _methods(*names: str) -> frozenset[str]:
    """``Service/Method`` names as full method names; KeyError for a method not in the proto."""
    full = frozenset(f"/{pb.DESCRIPTOR.package}.{name}" for name in names)
    missing = sorted(full - ALL_METHODS)
    if missing:
        raise KeyError(f"not in proto/expertplane.proto: {', '.join(missing)}")
    return full


# What each component calls (the stubs' uses): agent/uplink.py, agent/rollout.py,
# agent/collector.py, engines/plan_file_writer.py (GetPlan); worker/process.py;
# controller/operator/client.py; engines/ (the vLLM
# plugin sends its load windows with the worker role).
ROLE_METHODS: Mapping[str, frozenset[str]] = {
    "agent": _methods("LoadService/ReportLoad", "RolloutService/Connect", "PlanService/GetPlan",
                      "WorkerService/PullCounters", "WorkerService/Prepare",
                      "WorkerService/Commit", "WorkerService/Abort", "WorkerService/SetBias"),
    "worker": _methods("PlanService/GetPlan", "AgentService/Register",
                       "AgentService/ReportEngineLoad"),
    "operator": _methods("PlanService/ApplyPlacement", "PlanService/DeletePlacement",
                         "PlanService/ListPlacements", "PlanService/GetPlan",
                         "PlanService/ListPlans", "PlanningService/ComputePipeline",
                         "PlanningService/TriggerRebalance"),
    "reader": frozenset(m for m in ALL_METHODS
                        if m.rsplit("/", 1)[1].startswith(("Get", "List", "Watch"))),
    "admin": ALL_METHODS,
}

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["callers"],
    "properties": {
        "own_token_file": {"type": "string", "minLength": 1},
        "callers": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object", "additionalProperties": False,
                "required": ["name", "roles"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "token_sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
                    "token_file": {"type": "string", "minLength": 1},
                    "identity": {"type": "string", "minLength": 1},
                    "roles": {"type": "array", "minItems": 1,
                              "items": {"enum": sorted(ROLE_METHODS)}},
                },
            },
        },
    },
}


class CallersFileError(ValueError):
    """A callers file that does not validate; ``field`` is the path of the offending key, e.g.
    ``callers[1].roles[0]``, and the message starts with the file and the field."""

    def __init__(self, source: str, field: str, message: str):
        super().__init__(f"{source}: {field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Caller:
    """One caller: a name for messages and logs, its roles, the methods they allow, and how it is
    recognised (``token_digest``: SHA-256 of its bearer token, 32 bytes; ``identity``: a client
    certificate's CN or SAN)."""

    name: str
    roles: tuple[str, ...]
    methods: frozenset[str]
    token_digest: bytes | None = None
    identity: str | None = None

    def may_call(self, method: str) -> bool:
        return method in self.methods


@dataclass(frozen=True)
class Denial:
    """Why a call is refused: the status code and a message naming the caller and the method."""

    code: grpc.StatusCode
    message: str


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class CallerTable:
    """The callers a server knows, in file order."""

    callers: tuple[Caller, ...]

    @classmethod
    def single(cls, token: str) -> CallerTable:
        """The one-token format: every holder of ``token`` may call every method."""
        return cls((Caller("token holder", ("admin",), ALL_METHODS, token_digest=_digest(token)),))

    @property
    def has_identities(self) -> bool:
        return any(c.identity for c in self.callers)

    def by_token(self, token: str) -> Caller | None:
        """The caller of ``token``; every digest is compared (constant time per entry)."""
        given = _digest(token)
        found = None
        for caller in self.callers:
            match = caller.token_digest is not None and hmac.compare_digest(caller.token_digest, given)
            found = caller if match and found is None else found
        return found

    def by_identity(self, names: Iterable[str]) -> Caller | None:
        """The first caller whose identity is one of ``names`` (a certificate's CN and SANs)."""
        names = set(names)
        return next((c for c in self.callers if c.identity in names), None)

    def check(self, method: str, authorization: str | None,
              cert_names: Callable[[], list[str]]) -> Denial | None:
        """None if the call may proceed, else why not. ``authorization``: the header's value;
        ``cert_names``: the verified client certificate's CN and SANs (called only when needed)."""
        if authorization is not None:
            token = bearer_token(authorization)
            caller = self.by_token(token) if token else None
            if caller is None:
                return Denial(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        else:
            names = cert_names() if self.has_identities else []
            caller = self.by_identity(names)
            if caller is None:
                return Denial(grpc.StatusCode.UNAUTHENTICATED, _unknown_message(names))
        if caller.may_call(method):
            return None
        return Denial(grpc.StatusCode.PERMISSION_DENIED,
                      f"caller {caller.name!r} (roles: {', '.join(caller.roles)}) may not call {method}")


def bearer_token(authorization: str) -> str | None:
    """The token of an ``authorization`` header value ``Bearer <token>``; the scheme name is
    case-insensitive (RFC 7235: ``bearer``, ``BEARER``), separated by one or more spaces. None
    for another scheme or no token."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip(" ")
    return token if scheme.lower() == "bearer" and token else None


def _unknown_message(names: list[str]) -> str:
    if not names:
        return "missing bearer token"
    return f"missing bearer token, and the client certificate ({', '.join(names)}) names no caller"


# ---------------------------------------------------------------------------- the file


def _field_path(parts: Iterable) -> str:
    """``["callers", 1, "roles", 0]`` -> ``callers[1].roles[0]``."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(document)"


def _error_field(err: jsonschema.ValidationError) -> str:
    """The path of the key a schema error is about: for a missing or an unexpected key, that key
    (``callers[0].name``), else the value's path."""
    path = list(err.absolute_path)
    if err.validator == "required":
        path.append(next(k for k in err.validator_value if k not in err.instance))
    elif err.validator == "additionalProperties":
        path.append(next(k for k in err.instance if k not in err.schema.get("properties", {})))
    return _field_path(path)


def _read_token(path: pathlib.Path, source: str, field: str) -> str:
    """The one-line token in ``path``; CallersFileError naming ``field`` if unreadable or empty."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise CallersFileError(source, field, f"cannot read {path}: {exc.strerror}") from None
    if not token or len(token.splitlines()) != 1:
        raise CallersFileError(source, field, f"{path} must hold one token on one line")
    return token


def _caller(i: int, entry: dict, base: pathlib.Path, source: str) -> Caller:
    """Caller ``i`` of a validated document; token files resolve against ``base``."""
    field = f"callers[{i}]"
    if "token_sha256" in entry and "token_file" in entry:
        raise CallersFileError(source, field, "give token_sha256 or token_file, not both")
    if not {"token_sha256", "token_file", "identity"} & entry.keys():
        raise CallersFileError(source, field, "needs token_sha256, token_file or identity")
    digest = bytes.fromhex(entry["token_sha256"]) if "token_sha256" in entry else None
    if "token_file" in entry:
        digest = _digest(_read_token(base / entry["token_file"], source, f"{field}.token_file"))
    roles = tuple(dict.fromkeys(entry["roles"]))
    methods = frozenset().union(*(ROLE_METHODS[r] for r in roles))
    return Caller(entry["name"], roles, methods, token_digest=digest, identity=entry.get("identity"))


def _check_unique(callers: list[Caller], source: str) -> None:
    """Names, tokens and identities must each name one caller (else the caller is ambiguous)."""
    for attr, label in (("name", "name"), ("token_digest", "token"), ("identity", "identity")):
        seen: dict = {}
        for i, caller in enumerate(callers):
            value = getattr(caller, attr)
            if value is not None and value in seen:
                raise CallersFileError(source, f"callers[{i}]",
                                       f"same {label} as callers[{seen[value]}]")
            seen.setdefault(value, i)


def callers_from_dict(doc, base: pathlib.Path, source: str) -> CallerTable:
    """Validate a callers document against ``SCHEMA`` and build its table (token files relative
    to ``base``). Raises CallersFileError naming the field."""
    errors = list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(doc))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        raise CallersFileError(source, _error_field(err), err.message)
    callers = [_caller(i, entry, base, source) for i, entry in enumerate(doc["callers"])]
    _check_unique(callers, source)
    return CallerTable(tuple(callers))


@dataclass(frozen=True)
class TokenFile:
    """What a token file holds: the token this process sends (``token``) and, for a callers
    file, the callers its servers accept (``callers``; None: the single token is full access)."""

    token: str | None
    callers: CallerTable | None = None


def read_token_file(path: str) -> TokenFile:
    """Read a single-token file (one line, unchanged format) or a callers file (a YAML/JSON
    mapping). Raises CallersFileError naming the field, OSError if unreadable."""
    text = pathlib.Path(path).read_text()
    stripped = text.strip()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if len(stripped.splitlines()) == 1 and not stripped.startswith("{"):
            return TokenFile(stripped)
        raise CallersFileError(path, "(document)", " ".join(str(exc).split())) from None
    if isinstance(doc, dict):
        base = pathlib.Path(path).parent
        own = doc.get("own_token_file")
        table = callers_from_dict(doc, base, path)
        return TokenFile(_read_token(base / own, path, "own_token_file") if own else None, table)
    if len(stripped.splitlines()) != 1:
        raise CallersFileError(path, "(document)", "one token on one line, or a mapping with "
                                                   "'callers' (a callers file)")
    return TokenFile(stripped)


# ---------------------------------------------------------------------------- the interceptor


_BEHAVIOURS = {(False, False): "unary_unary", (False, True): "unary_stream",
               (True, False): "stream_unary", (True, True): "stream_stream"}


def _cert_names(context) -> list[str]:
    """The verified client certificate's common name and subject-alternative names."""
    auth = context.auth_context()
    values = list(auth.get("x509_common_name", ())) + list(auth.get("x509_subject_alternative_name", ()))
    return [v.decode(errors="replace") if isinstance(v, bytes) else v for v in values]


def _guard(handler: grpc.RpcMethodHandler, check: Callable) -> grpc.RpcMethodHandler:
    """``handler`` with ``check(context) -> Denial | None`` run before its behaviour, keeping the
    behaviour's kind (coroutine, async generator, function, generator) so that sync and aio
    servers run it as before; a denial aborts before any request is read."""
    field = _BEHAVIOURS[(handler.request_streaming, handler.response_streaming)]
    behaviour = getattr(handler, field)
    if inspect.isasyncgenfunction(behaviour):
        async def guarded(request, context):
            if (denial := check(context)) is not None:
                await context.abort(denial.code, denial.message)
            async for response in behaviour(request, context):
                yield response
    elif inspect.iscoroutinefunction(behaviour):
        async def guarded(request, context):
            if (denial := check(context)) is not None:
                await context.abort(denial.code, denial.message)
            return await behaviour(request, context)
    elif handler.response_streaming:
        def guarded(request, context):      # a generator: acts when iterated (aio runs it in the pool)
            if (denial := check(context)) is not None:
                context.abort(denial.code, denial.message)
            yield from behaviour(request, context)
    else:
        def guarded(request, context):
            if (denial := check(context)) is not None:
                context.abort(denial.code, denial.message)
            return behaviour(request, context)
    return handler._replace(**{field: guarded})


class AuthorizationInterceptor(grpc.ServerInterceptor):
    """Checks every call (except health and reflection) against a CallerTable: UNAUTHENTICATED
    for no known caller, PERMISSION_DENIED for a method none of the caller's roles allows.
    Refusals are logged with the caller and the method, never the token.

    The guarded handler of a method is built once and reused by its later calls (the check reads
    each call's own metadata): one entry per method the server resolves, rebuilt only if the
    server hands back another handler for it."""

    def __init__(self, table: CallerTable):
        self._table = table
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_METHODS):
            return handler
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, _guard(handler, functools.partial(self._check, method)))
            self._guarded[method] = cached
        return cached[1]

    def _check(self, method: str, context) -> Denial | None:
        """The call's denial (logged), or None: its caller from its own ``authorization``
        header or client certificate."""
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        denial = self._table.check(method, authorization, lambda: _cert_names(context))
        if denial is not None:
            log.warning("refused %s from %s: %s %s", method, context.peer(), denial.code.name,
                        denial.message)
        return denial
