"""Wire messages between connectors, proxy and coordinator (msgpack, versioned).

Every message travels as two ZMQ frames: ``[PROTOCOL_TAG, msgpack(msg)]``. A peer speaking
another version, or sending anything that does not decode to one of these structs, gets an
``Error`` reply and is counted; the coordinator never crashes on it.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

# 2: READY streams (chunks_ready, final), WAIT says what it has (have); 3: timings (READY's gather/put,
# DONE's parts, the records' timeline and spans, Query's span summary); within 3, added later (a peer
# without them answers Error): FIRST, AWAIT_FIRST, FIRST_OUTCOME, FIRST_TOKEN
PROTOCOL_VERSION = 3
PROTOCOL_TAG = b"pdkv/%d" % PROTOCOL_VERSION


# Field types with the values a peer may send: anything else is refused at decoding (an Error
# naming the field), so that no count, rank or duration from the wire is negative, NaN or infinite.
Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 53)]  # a float counter adds it exactly
# Strings a peer may send are bounded (an authorized peer could otherwise make the coordinator hold
# and log megabytes per message): ids are short and plain, free text is cut at 4 KiB.
MAX_ID_CHARS = 128
ID_PATTERN = r"^[A-Za-z0-9_.:/-]*\Z"  # \Z: "$" would let a trailing newline through
ID_RULE = f"at most {MAX_ID_CHARS} characters, each a letter, a digit or one of _ . : / -"
Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS, pattern=ID_PATTERN)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
Keys = Annotated[list[Annotated[str, msgspec.Meta(max_length=512)]], msgspec.Meta(max_length=1 << 16)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=1e9)]  # finite (NaN fails ge)
Millis = Annotated[float, msgspec.Meta(ge=0, le=1e12)]
Groups = Annotated[int, msgspec.Meta(ge=1, le=1024)]  # KV-head groups (pd.connector.heads)
WallMs = Annotated[float, msgspec.Meta(ge=0, le=1e15)]  # time.time() * 1000 on the sender's clock; 0: not given
MAX_LOAD_PARTS = 64  # a DONE lists at most this many load parts (its totals count them all)
Role = Literal["prefill", "decode", "both", "proxy"]


class _Msg(msgspec.Struct, tag_field="type", tag=lambda name: name.lower(), forbid_unknown_fields=True):
    pass


# ---- client -> coordinator -------------------------------------------------------------


class Register(_Msg):
    instance_id: Id
    role: Role
    url: Text = ""
    pid: Count = 0


class Heartbeat(_Msg):
    """Liveness; the optional fields let a restarted coordinator re-register the instance fully."""

    instance_id: Id
    role: Role | Literal[""] = ""
    url: Text = ""
    pid: Count = 0
    # The instance's own counters (its connector's transfers, transport and store), exported by
    # the coordinator summed per role: the faults only an instance sees (a full disk, a READY it
    # could not deliver, a dead producer's arena it removed) are counted somewhere one can scrape.
    stats: dict[Annotated[str, msgspec.Meta(max_length=100)], Annotated[float, msgspec.Meta(ge=0, le=1e18)]] = {}


class Ready(_Msg):
    """Prefill published KV of ``pd_id`` (one TP rank) as these transport keys.

    Chunks are published while the prompt is prefilled: a READY with ``final`` False says the
    first ``chunks_ready`` chunks are out and more will follow; ``keys`` are the keys of this
    publication only (the coordinator merges them and answers WAITs with the merged READY).
    ``chunks_ready`` 0 with ``final`` means every chunk of the prompt.
    """

    pd_id: Id
    rank: Count
    keys: Keys
    n_tokens: Count
    n_bytes: Count = 0
    location: Text = ""  # transport kind + address, e.g. "shm:/dev/shm/pdkv-default"
    instance_id: Id = ""
    chunks_ready: Count = 0
    final: bool = True
    # ``rank`` is the KV-head group (pd.connector.heads; the TP rank when groups = TP size); the transfer is
    # ready when the final READY of each of ``groups`` groups is in.
    groups: Groups = 1
    # This part's timings at the prefill worker (the timeline, docs/design.md): the chunks it saved, the
    # time their gather and their put (transport and store) took, and when READY left (its clock).
    part_chunks: Count = 0
    gather_ms: Millis = 0.0
    put_ms: Millis = 0.0
    sent_ms: WallMs = 0.0


class Wait(_Msg):
    """Decode asks for READY of ``pd_id``/``rank`` beyond the ``have`` chunks it has loaded;
    answered when a final READY or one with more than ``have`` chunks is there, or at timeout."""

    pd_id: Id
    rank: Count
    timeout_s: Seconds
    have: Count = 0


class LoadPart(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """One part of a decode load (the chunks one READY part made available): when it ended (the
    decode worker's clock), its chunks, how long their reads (transport), store fallback reads and
    scatters took, and how many came from the store."""

    at_ms: WallMs
    chunks: Count = 0
    get_ms: Millis = 0.0
    store_ms: Millis = 0.0
    scatter_ms: Millis = 0.0
    store_chunks: Count = 0


class Done(_Msg):
    """Decode finished with ``pd_id``: loaded (ok) or gave up (error); chunks may be freed."""

    pd_id: Id
    rank: Count
    ok: bool
    instance_id: Id = ""
    n_chunks: Count = 0
    n_bytes: Count = 0
    load_ms: Millis = 0.0
    error: Text = ""
    n_store_chunks: Count = 0  # of n_chunks, how many came from the persistent store
    groups: Groups = 1  # KV-head groups of the transfer: it is done when each group's DONE is in
    # The load's parts (the first MAX_LOAD_PARTS; the timeline) and its totals over all of them.
    parts: Annotated[list[LoadPart], msgspec.Meta(max_length=MAX_LOAD_PARTS)] = []
    get_ms: Millis = 0.0
    store_ms: Millis = 0.0
    scatter_ms: Millis = 0.0
    # Loaded within the engine step that admitted the request (connector.sync_load): no WAIT came.
    sync: bool = False


class Abort(_Msg):
    """The request was cancelled (client gone, upstream error): release waiters, free chunks."""

    pd_id: Id
    reason: Text = ""


TokenId = Annotated[int, msgspec.Meta(ge=-1, le=(1 << 31) - 1)]  # -1: none (the decode computes token 1)


class First(_Msg):
    """The prefill's scheduler hands token 1 of ``pd_id`` (the token it sampled) to the early decode
    waiting for it (pd.coordinator.first). ``Ack`` when a decode waits for it (handed over), ``Error``
    when none does (the decode then computes token 1 itself) or ``pd_id`` was aborted."""

    pd_id: Id
    token_id: TokenId


class AwaitFirst(_Msg):
    """An early decode waits for token 1 of ``pd_id``: ``FirstToken`` once settled (the token, or -1:
    compute it yourself), ``Aborted``, or ``WaitTimeout`` when ``timeout_s`` passed unsettled (ask
    again). With ``give_up`` it stops waiting: a token already handed over is still answered (and
    must be used); otherwise the hand-off is settled as -1."""

    pd_id: Id
    timeout_s: Seconds
    give_up: bool = False


class FirstOutcome(_Msg):
    """The proxy asks how the hand-off of ``pd_id``'s token 1 was settled: ``FirstToken`` (the token
    handed over, or -1: the decode computes token 1), parked until settled; past ``timeout_s`` the
    coordinator settles it as -1 itself (a FIRST that never came)."""

    pd_id: Id
    timeout_s: Seconds


class Query(_Msg):
    """Ask for counters, instances and (optionally) the record of one transfer and the p50/p99 of
    each span over the recent transfers (``spans``)."""

    pd_id: Id = ""
    spans: bool = False


# ---- coordinator -> client -------------------------------------------------------------


class Ack(_Msg):
    pass


class WaitTimeout(_Msg):
    pd_id: str


class FirstToken(_Msg):
    """How the hand-off of ``pd_id``'s token 1 is settled: the token, or -1 (the decode computes it)."""

    pd_id: str
    token_id: int


class Aborted(_Msg):
    pd_id: str
    reason: str = ""


class Free(_Msg):
    """Sent to the producer that published ``keys``: they will not be read, delete them."""

    pd_id: str
    keys: list[str]


class Error(_Msg):
    reason: str


class InstanceInfo(msgspec.Struct):
    instance_id: str
    role: str
    url: str
    pid: int
    alive: bool
    last_seen_s: float  # seconds since the last heartbeat


class Event(msgspec.Struct, omit_defaults=True):
    """One event of a transfer's timeline: ``name``, ``t_ms`` (time.time() * 1000 on ``source``'s
    clock: "proxy", "coordinator", "prefill <group>", "decode <group>") and what it carries."""

    name: str
    t_ms: float
    source: str
    chunks: int = 0
    gather_ms: float = 0.0
    put_ms: float = 0.0
    get_ms: float = 0.0
    store_ms: float = 0.0
    scatter_ms: float = 0.0
    store_chunks: int = 0


class SpanSummary(msgspec.Struct):
    """One span over recent transfers: how many had it, its median and 99th percentile (ms)."""

    n: int
    p50: float
    p99: float


class TransferRecord(msgspec.Struct):
    pd_id: str
    ready: bool = False
    done: bool = False
    ok: bool = False
    n_tokens: int = 0
    n_chunks: int = 0
    n_bytes: int = 0
    load_ms: float = 0.0
    wait_ms: float = 0.0
    error: str = ""
    n_store_chunks: int = 0
    producer: str = ""
    consumer: str = ""
    n_ready_parts: int = 0  # READY messages (one per engine step that completed chunks, per rank)
    # From the final READY (the prompt's last chunks out) to DONE, at the coordinator: the part of
    # the transfer that streaming could not hide behind the prefill.
    tail_ms: float = 0.0
    # KV-head groups (pd.connector.heads) whose final READY / DONE are in; ready and done need all of them.
    # n_chunks is the fewest any group loaded, ok all groups', n_bytes and n_store_chunks the sums.
    groups_ready: int = 0
    groups_done: int = 0
    sync_load: bool = False  # the decode loaded it within the step that admitted its request
    # The timeline (pd.coordinator.timeline): events in arrival order (READY parts beyond a bound are
    # counted in events_dropped, never the final ones) and spans, named durations in ms.
    timeline: list[Event] = []
    spans: dict[str, float] = {}
    events_dropped: int = 0


class QueryReply(_Msg):
    counters: dict[str, float]
    instances: list[InstanceInfo]
    transfer: TransferRecord | None = None
    spans: dict[str, SpanSummary] = {}  # with Query.spans: each span over the recent transfers


ClientMsg = Register | Heartbeat | Ready | Wait | Done | Abort | Query | First | AwaitFirst | FirstOutcome
ReplyMsg = Ack | Ready | WaitTimeout | Aborted | Free | Error | QueryReply | FirstToken

_encoder = msgspec.msgpack.Encoder()
_client_decoder = msgspec.msgpack.Decoder(ClientMsg)
_reply_decoder = msgspec.msgpack.Decoder(ReplyMsg)


class ProtocolError(ValueError):
    pass


def valid_id(value: str) -> bool:
    """Whether ``value`` is a non-empty id the coordinator takes (a pd_id, an instance id): ``ID_RULE``."""
    return 0 < len(value) <= MAX_ID_CHARS and re.fullmatch(ID_PATTERN, value) is not None


def encode(msg: msgspec.Struct) -> list[bytes]:
    return [PROTOCOL_TAG, _encoder.encode(msg)]


def _decode(frames: list[bytes], decoder: msgspec.msgpack.Decoder):
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    if frames[0] != PROTOCOL_TAG:
        raise ProtocolError(f"unsupported protocol tag {bytes(frames[0][:32])!r}; this is {PROTOCOL_TAG!r}")
    try:
        return decoder.decode(frames[1])
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"undecodable message: {e}") from None


def decode_client(frames: list[bytes]) -> ClientMsg:
    return _decode(frames, _client_decoder)


def decode_reply(frames: list[bytes]) -> ReplyMsg:
    return _decode(frames, _reply_decoder)
