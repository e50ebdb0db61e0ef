"""Credentials (S3 keys, the serving API key) that never land in a file, a log, an error or any
config Ray keeps or shows.

A ``Secret`` holds its value in this process. Pickled (that is how Ray ships task arguments,
Train's ``train_loop_config`` and Serve's deployments) it carries only a random reference; the
value goes to one in-memory actor, and the process that unpickles it asks that actor once, when it
first needs the value. ``repr``, ``str`` and JSON show ``***``. ``redact`` blanks every secret this
process knows out of a text (error messages, log lines).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

MASK = "***"
HOLDER_NAME = "lmflow_ray_secrets"
HOLDER_NAMESPACE = "lmflow_ray"
HEAD_RESOURCE = "node:__internal_head__"  # the resource only Ray's head node has

_lock = threading.Lock()
_values: dict[str, str] = {}      # reference -> value, for the secrets this process holds
_refs: dict[str, str] = {}        # value -> reference (one reference per value)
_published: set[str] = set()      # references the holder actor already has


class Secret:
    """A credential. ``reveal()`` gives the value; nothing else does."""

    __slots__ = ("_ref",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError("a secret is a non-empty string")
        with _lock:
            ref = _refs.get(value)
            if ref is None:
                ref = _refs[value] = uuid.uuid4().hex
                _values[ref] = value
        self._ref = ref

    @classmethod
    def _from_ref(cls, ref: str) -> "Secret":
        secret = cls.__new__(cls)
        secret._ref = ref
        return secret

    def reveal(self) -> str:
        value = _values.get(self._ref)
        if value is None:
            value = _fetch(self._ref)
        return value

    async def reveal_async(self) -> str:
        """``reveal()`` for an event loop: waits for the holder without blocking the loop."""
        value = _values.get(self._ref)
        if value is None:
            value = await _fetch_async(self._ref)
        return value

    def __copy__(self) -> "Secret":
        return self

    def __deepcopy__(self, memo: dict) -> "Secret":
        return self

    def __reduce__(self):
        _publish_if_connected(self._ref)
        return (_restore, (self._ref,))

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._ref == self._ref

    def __hash__(self) -> int:
        return hash(self._ref)


def _restore(ref: str) -> Secret:
    return Secret._from_ref(ref)


def secret(value: Any) -> Secret | None:
    """``value`` as a Secret (None and "" stay None; a Secret stays itself)."""
    if value is None or value == "":
        return None
    if isinstance(value, Secret):
        return value
    return Secret(str(value))


def reveal(value: Secret | str | None) -> str | None:
    return value.reveal() if isinstance(value, Secret) else value


def redact(text: str) -> str:
    """``text`` with every secret value this process holds replaced by ***."""
    with _lock:
        known = sorted((v for v in _values.values() if len(v) >= 4), key=len, reverse=True)
    for value in known:
        text = text.replace(value, MASK)
    return text


# ---- the holder actor: where a value waits for the processes that unpickle its reference --------

class _Holder:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def put(self, ref: str, value: str) -> None:
        self.values[ref] = value

    def get(self, ref: str) -> str | None:
        return self.values.get(ref)


def _holder(create: bool):
    import ray

    if create:
        # On the head node, which the cluster cannot lose and go on: placed anywhere, it would take
        # every credential with it when its node went (a restarted worker group could not start).
        return (ray.remote(num_cpus=0, max_restarts=0)(_Holder)
                .options(name=HOLDER_NAME, namespace=HOLDER_NAMESPACE, lifetime="detached", get_if_exists=True,
                         resources={HEAD_RESOURCE: 0.001})
                .remote())
    return ray.get_actor(HOLDER_NAME, namespace=HOLDER_NAMESPACE)


def _publish_if_connected(ref: str) -> None:
    """Hand the value to the holder, once, if this process is connected to Ray; otherwise it is
    handed over by ``publish_pending`` when the process connects (see ray_init.connect)."""
    import sys

    ray = sys.modules.get("ray")  # never imports Ray itself: a process without it has nothing to hand over
    if ray is None or not ray.is_initialized() or ref in _published or ref not in _values:
        return
    ray.get(_holder(create=True).put.remote(ref, _values[ref]))
    _published.add(ref)


def publish_pending() -> None:
    """Every secret this process created before it connected to Ray, handed to the holder."""
    for ref in list(_values):
        _publish_if_connected(ref)


def _fetch(ref: str) -> str:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("a credential shared through Ray is read inside Ray processes only")
    try:
        value = ray.get(_holder(create=False).get.remote(ref))
    except ValueError:  # no holder actor on this cluster
        value = None
    return _keep(ref, value)


async def _fetch_async(ref: str) -> str:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("a credential shared through Ray is read inside Ray processes only")
    try:
        value = await _holder(create=False).get.remote(ref)
    except ValueError:
        value = None
    return _keep(ref, value)


def _keep(ref: str, value: str | None) -> str:
    if value is None:
        raise RuntimeError("a credential this process was given is not on this Ray cluster (the process that "
                           "held it never shared it); give credentials through the nodes' environment instead")
    with _lock:
        _values[ref] = value
        _refs.setdefault(value, ref)
    _published.add(ref)
    return value
