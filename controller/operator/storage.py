"""Where kopf keeps its own bookkeeping on our objects: small annotations only.

kopf's default diff base is the whole last-handled spec in one annotation. Annotations of an
object may hold 256 KiB in total, so a large spec (a big inline load) made every later write of
the object fail with 422 while the status still said Ready. Our handlers are level-triggered
(they read the whole object, never kopf's diff), so kopf only needs to know *whether* the
essence changed since it was last handled: a SHA-256 digest of it (71 bytes) does that.
"""

from __future__ import annotations

import hashlib
import json

import kopf

PREFIX = "kopf.expertplane.io"
DIFFBASE_KEY = "last-handled-digest"


def essence_digest(essence) -> str:
    """``sha256:<hex>`` of an essence (a JSON-able mapping), independent of key order."""
    text = json.dumps(essence, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class DigestDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotation diff base holding a digest of the last-handled essence instead of the
    essence itself.

    ``fetch`` returns the current essence when its digest matches the stored one (no change),
    an essence that differs from every real one when it does not (kopf then runs the update
    handlers), and None when nothing was stored (kopf runs the create handlers).
    """

    def __init__(self) -> None:
        super().__init__(prefix=PREFIX, key=DIFFBASE_KEY)

    def _normal(self, essence) -> dict:
        """``essence`` without kopf's own annotations (progress records, markers)."""
        essence = json.loads(json.dumps(essence))
        annotations = (essence.get("metadata") or {}).get("annotations") or {}
        for key in [k for k in annotations if k.startswith(f"{PREFIX}/")]:
            del annotations[key]
        self.remove_empty_stanzas(essence)
        return essence

    def fetch(self, *, body):
        stored = next((body.metadata.annotations[k] for k in self.make_keys(self.key, body=body)
                       if k in body.metadata.annotations), None)
        if stored is None:
            return None
        current = self._normal(self.build(body=body))
        if stored.strip() == essence_digest(current):
            return current
        return {"changed-since": stored.strip()}

    def store(self, *, body, patch, essence) -> None:
        for key in self.make_keys(self.key, body=body):
            patch.metadata.annotations[key] = essence_digest(self._normal(essence))
        self._store_marker(prefix=self.prefix, patch=patch, body=body)
