"""One run at a time per run folder: a lease file (owner, expiry) that the driver renews while it
trains. A second run with the same run_name, or a `--fresh` on it, is refused while the lease is
live; a lease whose owner stopped renewing it (killed, lost its machine) expires and can be taken,
at once when the owner was a process on this machine that no longer runs."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from lmflow_ray import storage
from lmflow_ray.errors import StorageError, UserError

LEASE = ".lease.json"
TTL_S = 120.0       # a lease not renewed for this long is stale
RENEW_S = 30.0
SETTLE_S = 0.5      # between writing the lease and reading it back: two runs starting together see each other


def _gone(owner: dict) -> bool:
    """Whether a lease's owner was a process on this machine that has ended (killed, crashed): its
    lease need not be waited out."""
    from lmflow_ray.storage import _alive

    pid = owner.get("pid")
    return owner.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and not _alive(pid)


class Lease:
    def __init__(self, run_uri: str, s3: Any, ttl: float = TTL_S, renew: float = RENEW_S) -> None:
        self.run_uri, self.s3, self.ttl, self.renew_every = run_uri, s3, ttl, renew
        self.uri = storage.join(run_uri, LEASE)
        self.owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- reading and writing the lease file ----

    def read(self) -> dict | None:
        raw = storage.read_bytes(self.uri, self.s3)
        if raw is None:
            return None
        try:
            body = json.loads(raw)
        except ValueError:
            return None  # a torn write of a lease: as good as none
        return body if isinstance(body, dict) else None

    def _write(self) -> None:
        now = time.time()
        body = {"owner": self.owner, "renewed": now, "expires": now + self.ttl, "ttl_s": self.ttl}
        storage.write_bytes(self.uri, json.dumps(body).encode(), self.s3)

    def _ours(self, body: dict | None) -> bool:
        return bool(body) and (body.get("owner") or {}).get("id") == self.owner["id"]

    # ---- the lifecycle ----

    def acquire(self, say: Callable[[str], None] = print) -> "Lease":
        current = self.read()
        if current is not None and not self._ours(current):
            left = float(current.get("expires", 0)) - time.time()
            who = current.get("owner") or {}
            if left > 0 and _gone(who):
                say(f"taking over the run folder from a run whose driver is gone (pid {who.get('pid')} on this "
                    f"machine, {who.get('host')}, no longer runs)")
                left = 0.0
            elif left > 0:
                raise UserError(
                    f"{self.run_uri}: another run is using this run folder (pid {who.get('pid')} on "
                    f"{who.get('host')}, lease renewed {time.time() - float(current.get('renewed', 0)):.0f} s ago). "
                    f"Wait for it to end, or use another run_name; if its driver is gone, its lease expires "
                    f"in {left:.0f} s")
            say(f"taking over the run folder from a run that stopped renewing its lease "
                f"(pid {who.get('pid')} on {who.get('host')}, expired {-left:.0f} s ago)")
        self._write()
        time.sleep(SETTLE_S)
        if not self._ours(self.read()):
            raise UserError(f"{self.run_uri}: another run took this run folder at the same moment; "
                            "use another run_name, or wait for it to end")
        self._thread = threading.Thread(target=self._keep, name="lmflow-ray-lease", daemon=True)
        self._thread.start()
        return self

    def _keep(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                if not self._ours(self.read()):
                    self.lost = True
                    return
                self._write()
            except StorageError:
                continue  # storage hiccup: try again at the next beat, while the lease still runs

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._ours(self.read()):
                storage.remove(self.uri, self.s3)
        except StorageError:
            pass  # it expires by itself

    def __enter__(self) -> "Lease":  # `with Lease(...).acquire(say) as lease:` releases it at the end
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()
