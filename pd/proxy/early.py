"""The early decode: on the first-token path, a greedy request's decode half goes out with its prefill half.

Sent after the prefill has answered, the decode half pays vLLM's start of a request (its HTTP
parse, admission, prefix hashing, one engine step) between token 1 and token 2: on one H100
about 24 ms at 8000 tokens, where colocated's inter-token latency is 6 ms. Sent with the
prefill half, that start overlaps the prefill: the decode waits for the KV as in the old flow,
recomputes the prompt's last token and samples token 1 itself, then token 2 one step later.

Token 1 still reaches the client from the prefill. The decode's own token 1 is checked against
it by id: for a greedy request both are the argmax of the same logits, so they agree unless two
tokens are within rounding of each other. When they agree the decode's answer *is* the answer
(its stop strings, ``finish_reason``, ``usage``, ``logprobs`` are a colocated instance's), and
the proxy passes it on without the text the client already has. When they differ (or the early
decode fails before its token 1) the proxy closes it (vLLM aborts it) and falls back to the
decode request after the prefill (``pd.proxy.first_token.decode_body``).

Only greedy requests (``temperature`` 0, or ``top_k`` 1): a sampled one would draw a different
token 1 on each instance. Pure functions: no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pd.proxy import first_token as ft
from pd.proxy.routing import decode_body as old_flow_body


class Differs(Exception):
    """The early decode's token 1 (or its text) is not the prefill's: its answer is not used."""


def greedy(body: dict) -> bool:
    """The request samples greedily: ``temperature`` 0 or ``top_k`` 1 (absent, vLLM's default
    temperature applies, which may sample)."""
    t, k = body.get("temperature"), body.get("top_k")
    number = (int, float)
    return (isinstance(t, number) and not isinstance(t, bool) and t == 0) or (
        isinstance(k, int) and not isinstance(k, bool) and k == 1)


def early_body(endpoint: str, body: dict, pd_id: str, handoff: bool = False) -> dict:
    """The early decode half: the client's request (the decode tokenizes the prompt as the
    prefill does), streamed with token ids and usage, its KV to be fetched as ``pd_id``;
    ``handoff``: its scheduler waits for token 1 from the proxy (``pd.connector.handoff``)."""
    out = old_flow_body({k: v for k, v in body.items() if k not in ("stream_options",)}, pd_id)
    out.update(stream=True, stream_options={"include_usage": True}, return_token_ids=True)
    if handoff:
        out["kv_transfer_params"]["handoff"] = True
    return out


def handoff_allowed(st: ft.StreamState) -> bool:
    """Whether the early decode may continue from the prefill's token 1 (its answer then starts at
    token 2). Its API server decodes the text of token 2 on after the client's prompt, without
    token 1; vLLM's incremental detokenizer gives a token's text from a window of the tokens
    before it, so that is colocated's text only where the text stands at a character boundary
    both after the prompt and after token 1. The prefill's answer shows both: token 1's text
    there (decoded after the prompt, as colocated decodes it) must equal token 1 decoded alone
    (its logprobs entry), be non-empty and not end in U+FFFD (vLLM's mark of an incomplete
    character). And the decode's stop strings never see token 1's text, so a stop string that
    could start in it keeps the decode computing token 1."""
    f = st.first
    return (bool(f.text) and f.text == f.token_str and not f.text.endswith("\ufffd")
            and ft.hold_from(st.body, f.text, len(f.text)) == len(f.text))


@dataclass
class Early:
    """The early decode's answer being checked against token 1 and passed on after it."""

    st: ft.StreamState
    sent: str  # the text the client has (token 1's, less what a stop string might begin)
    text: str = ""  # the decode's text until it has passed ``sent``
    checked: bool = False  # its token 1 was the prefill's
    past: bool = False  # its text has passed ``sent``: all that comes now is new to the client

    @classmethod
    def after_opening(cls, st: ft.StreamState) -> "Early":
        """Once ``ft.opening`` gave the client token 1 (holding back ``st.held``)."""
        f = st.first.text
        return cls(st, f[:len(f) - len(st.held)])


def _drop_first(lp: Any) -> Any:
    """Completion logprobs without their first token's entries (token 1's come from the prefill);
    the others' ``text_offset`` already count from the answer's start, token 1 included."""
    if not isinstance(lp, dict):
        return lp
    return {k: v[1:] if isinstance(v, list) else v for k, v in lp.items()}


def _past_sent(e: Early, text: str, ends: bool) -> str:
    """Of the decode's ``text``, what the client has not had; ``Differs`` where it does not begin
    with what the client has. Only until the decode's text passes it (no copying after)."""
    e.text += text
    n = min(len(e.text), len(e.sent))
    if e.text[:n] != e.sent[:n]:
        raise Differs("the decode's text does not begin with token 1's")
    if ends and len(e.text) < len(e.sent):
        raise Differs("the decode's answer ended inside token 1's text")
    if len(e.text) < len(e.sent):
        return ""
    e.past, new, e.text = True, e.text[len(e.sent):], ""
    return new


def _check_prompt(st: ft.StreamState, obj: dict, c: dict) -> None:
    prompt = obj.get("prompt_token_ids") if st.first.chat else c.get("prompt_token_ids")
    if prompt is not None and prompt != st.first.prompt_ids:
        raise Differs("the decode tokenized the prompt otherwise than the prefill")


def handoff_event(e: Early, obj: dict) -> tuple[list[dict], bool]:
    """One event of an early decode that was handed token 1 (its answer starts at token 2) as the
    client's chunks, and whether the answer is over; ``Differs`` if its prompt is not the
    prefill's (checked on its first event, before anything of it reaches the client)."""
    st = e.st
    if not obj.get("choices"):
        return ft.decode_chunk(st, obj)  # the usage event
    c = obj["choices"][0]
    if not e.checked:
        _check_prompt(st, obj, c)
        e.checked = True
    text = ((c.get("delta") or {}).get("content") or "") if st.first.chat else (c.get("text") or "")
    ids = list(c.get("token_ids") or [])
    if st.first.chat and not (text or ids or c.get("finish_reason") is not None):
        return [], False  # chat's opening event (the role): the client has had one
    # As the first-token path's decode half: a completion chunk whose text starts at token 2.
    return ft.decode_chunk(st, {"choices": [{"text": text, "token_ids": ids, "finish_reason": c.get("finish_reason"),
                                             "stop_reason": c.get("stop_reason"), "logprobs": c.get("logprobs")}]})


def early_event(e: Early, obj: dict) -> tuple[list[dict], bool]:
    """One decode event as the client's chunks, and whether the answer is over (its usage event).

    Raises ``Differs`` if the decode's token 1 is not the prefill's, or its text does not begin
    with what the client was sent; nothing of such an answer has been given to the client then.
    """
    st = e.st
    if not obj.get("choices"):  # the usage event, after the last token
        return ([ft.usage_chunk(st)] if st.include_usage else []), True
    c = obj["choices"][0]
    ids = list(c.get("token_ids") or [])
    text = ((c.get("delta") or {}).get("content") or "") if st.first.chat else (c.get("text") or "")
    finish, stop_reason = c.get("finish_reason"), c.get("stop_reason")
    lp = None if st.first.chat or st.body.get("logprobs") is None else c.get("logprobs")
    if not e.checked:
        _check_prompt(st, obj, c)
        if not ids:
            if text or finish is not None:
                raise Differs("the decode's first text came without its token id")
            return [], False  # chat's opening event (the role): the client has had one
        if ids[0] != st.first.token_id:
            raise Differs(f"the decode's token 1 is {ids[0]}, the prefill's {st.first.token_id}")
        e.checked, ids, lp = True, ids[1:], _drop_first(lp)
    new = text if e.past else _past_sent(e, text, finish is not None)
    st.n_decode += len(ids)
    if not (new or ids or finish is not None or lp):
        return [], False
    return [ft._chunk(st, new, finish, stop_reason, lp, ids)], False
