"""Who may say what to the coordinator under CurveZMQ: instances bound to keys, per-key limits.

Every message of an authenticated connection carries its ZAP user id, the client's public key
and its allow-list name (``pd.coordinator.curve``), parsed here into a ``Peer``. The rules
(issue 18; docs/design.md "Security"):

- An instance id belongs to the key that first spoke for it (REGISTER, HEARTBEAT, READY or DONE
  naming it) until that key has been silent about it for ``instance_ttl_s`` (the instance is
  down). Another key's messages about it are refused, so no key but its own can move its FREEs to
  another socket or publish chunks in its name. A key named ``instance.<id>`` (``pd launch`` makes
  one per instance) speaks only for ``<id>`` and its TP ranks ``<id>/tp<N>``, and no other key may
  ever speak for an id that has such a key. Any other key speaks for at most ``max_instances``.
- A pd_id belongs to its producer's key (the first READY's) and its consumer's key (the first
  other key to WAIT, DONE or ABORT it); a third key's messages about it are refused. The control
  key (``client``: the proxy, ``pd stats``) may ABORT any pd_id, and only it may ask how token 1
  was handed over (FIRST_OUTCOME). A FIRST (token 1, from the prefill) counts as the producer's
  message, an AWAIT_FIRST (the decode's) as the consumer's.
- Each key has a token bucket of ``rate_per_s`` messages a second (a second's worth of burst);
  beyond it messages get an ``Error``.

Without CurveZMQ (``auth: none``, loopback only) there are no keys and none of this applies.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from pd.coordinator.protocol import Abort, AwaitFirst, Done, First, FirstOutcome, Heartbeat, Ready, Register, Wait

CONTROL_NAME = "client"        # the control host's key (proxy, pd stats)
INSTANCE_PREFIX = "instance."  # authorized/instance.<id>.key: the key of instance <id> only
RATE_PER_S = 5000.0            # messages a second per key (an instance sends a few per request)
MAX_INSTANCES_PER_KEY = 256    # instance ids (TP ranks count) one key may speak for
MAX_PD_OWNERS = 1 << 16        # pd_ids whose owners are remembered (oldest forgotten first)
PD_OWNER_TTL_S = 3600.0        # ... for at most this long after their last message
_TP_RANK = re.compile(r"^(.*)/tp\d+$")


@dataclass(frozen=True)
class Peer:
    """An authenticated client: its public key (z85) and allow-list name ("" if unknown)."""

    key: str
    name: str

    @property
    def control(self) -> bool:
        return self.name == CONTROL_NAME

    @property
    def own_instance(self) -> str | None:
        """The one instance an ``instance.<id>`` key speaks for; None for any other key."""
        return self.name[len(INSTANCE_PREFIX):] if self.name.startswith(INSTANCE_PREFIX) else None

    def __str__(self) -> str:
        return f"key {self.name or '?'!r} ({self.key[:8]}...)"


def peer_of(user_id: bytes | str | None) -> Peer | None:
    """The Peer of a ZAP user id ``<z85 key>:<name>``; None without one (no CurveZMQ)."""
    if not user_id:
        return None
    uid = user_id.decode("ascii", "replace") if isinstance(user_id, bytes) else user_id
    return Peer(uid[:40], uid[41:])


def instance_of(instance_id: str) -> str:
    """The instance a (TP rank's) id belongs to: ``prefill-0/tp1`` -> ``prefill-0``."""
    m = _TP_RANK.match(instance_id)
    return m.group(1) if m else instance_id


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float, at: float):
        self.tokens, self.at = tokens, at


class Identity:
    """The bindings and limits above; ``check(peer, msg, now)`` says why a message is refused
    (None: go ahead, and what it claims is now bound to ``peer``)."""

    def __init__(self, instance_ttl_s: float, reserved: Callable[[str], bool] = lambda _: False,
                 rate_per_s: float = RATE_PER_S, max_instances: int = MAX_INSTANCES_PER_KEY):
        self.instance_ttl_s = instance_ttl_s
        self.reserved = reserved  # whether an instance has a key of its own (instance.<id> authorized)
        self.rate_per_s = rate_per_s
        self.max_instances = max_instances
        self.instances: dict[str, tuple[Peer, float]] = {}  # instance id -> (its key, last message)
        self._per_key: dict[str, int] = {}  # key -> instance ids bound to it
        self.pd_owners: OrderedDict[str, list] = OrderedDict()  # pd_id -> [producer key, consumer key, last]
        self._buckets: dict[str, _Bucket] = {}

    def check(self, peer: Peer, msg, now: float) -> tuple[str, str] | None:
        """(kind, reason) of a refusal: kind ``rate`` (over the key's rate), ``identity``, or ``pd``
        (a READY of the sender's own instance for a pd_id another key publishes)."""
        if not self._take(peer.key, now):
            return "rate", (f"{peer} sent more than {self.rate_per_s:g} messages a second (the coordinator's "
                            "per-key limit); this one is refused")
        why = None
        if isinstance(msg, (Register, Heartbeat)):
            why = self._instance(peer, msg.instance_id, now)
        elif isinstance(msg, Ready):
            why = self._instance(peer, msg.instance_id, now)
            if why is None and (why := self._pd(peer, msg.pd_id, True, now)):
                return "pd", why  # the sender's own chunks: freed at its instance (a READY conflict)
        elif isinstance(msg, Done):
            why = self._instance(peer, msg.instance_id, now) or self._pd(peer, msg.pd_id, False, now)
        elif isinstance(msg, First):
            why = self._pd(peer, msg.pd_id, True, now)  # the producer's own token
        elif isinstance(msg, FirstOutcome) and not peer.control:
            why = f"{peer} may not ask how token 1 was handed over: only the control key ({CONTROL_NAME}: the proxy) may"
        elif isinstance(msg, (Wait, AwaitFirst)) or (isinstance(msg, Abort) and not peer.control):
            why = self._pd(peer, msg.pd_id, False, now)
        return ("identity", why) if why else None

    def _take(self, key: str, now: float) -> bool:
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) > 4 * MAX_INSTANCES_PER_KEY:  # keys are few (the allow-list); bound it anyway
                self._buckets.clear()
            b = self._buckets[key] = _Bucket(self.rate_per_s, now)
        b.tokens = min(self.rate_per_s, b.tokens + (now - b.at) * self.rate_per_s)
        b.at = now
        if b.tokens < 1:
            return False
        b.tokens -= 1
        return True

    def _instance(self, peer: Peer, instance_id: str, now: float) -> str | None:
        if not instance_id:
            return None
        base, own = instance_of(instance_id), peer.own_instance
        if own is not None and base != own:
            return f"{peer} is instance {own!r}'s own key: it speaks only for {own!r} (and {own}/tp<N>), not {instance_id!r}"
        if own is None and self.reserved(base):
            return f"instance {base!r} has a key of its own ({INSTANCE_PREFIX}{base}); {peer} may not speak for it"
        bound = self.instances.get(instance_id)
        if bound is not None and bound[0].key != peer.key:
            if now - bound[1] <= self.instance_ttl_s:
                return (f"instance {instance_id!r} belongs to {bound[0]}, which registered it first; {peer} may not "
                        "speak for it")
            self._unbind(instance_id)
            bound = None
        if bound is None:
            if self._per_key.get(peer.key, 0) >= self.max_instances:  # its instances that went down count no more
                for iid in [i for i, (p, at) in self.instances.items()
                            if p.key == peer.key and now - at > self.instance_ttl_s]:
                    self._unbind(iid)
            if self._per_key.get(peer.key, 0) >= self.max_instances:
                return (f"{peer} already speaks for {self.max_instances} instances (the most one key may); "
                        f"{instance_id!r} is refused")
            self._per_key[peer.key] = self._per_key.get(peer.key, 0) + 1
        self.instances[instance_id] = (peer, now)
        return None

    def _unbind(self, instance_id: str) -> None:
        peer, _ = self.instances.pop(instance_id)
        left = self._per_key.get(peer.key, 0) - 1
        if left > 0:
            self._per_key[peer.key] = left
        else:
            self._per_key.pop(peer.key, None)

    def _pd(self, peer: Peer, pd_id: str, producer: bool, now: float) -> str | None:
        owners = self.pd_owners.get(pd_id)
        if owners is None:
            owners = self.pd_owners[pd_id] = [None, None, now]
            while len(self.pd_owners) > MAX_PD_OWNERS:
                self.pd_owners.popitem(last=False)
        else:
            self.pd_owners.move_to_end(pd_id)
        slot = 0 if producer else 1
        if owners[slot] is None and (producer or peer.key != owners[0]):
            owners[slot] = peer.key  # the producer, or the first other key: the consumer
        elif peer.key not in owners[:2]:
            return (f"pd_id={pd_id} belongs to other keys (its {'producer' if producer else 'consumer'} is another "
                    f"key); {peer} may not {'publish' if producer else 'wait for, finish or abort'} it")
        owners[2] = now
        return None

    def sweep(self, now: float) -> None:
        """Forget pd_ids silent for PD_OWNER_TTL_S and instances whose key is long silent."""
        while self.pd_owners and now - next(iter(self.pd_owners.values()))[2] > PD_OWNER_TTL_S:
            self.pd_owners.popitem(last=False)
        for iid in [i for i, (_, at) in self.instances.items() if now - at > max(self.instance_ttl_s, 3600.0)]:
            self._unbind(iid)
