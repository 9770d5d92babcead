"""The first token from the prefill: which requests take that path, their two halves, the answer put together.

A request on this path (``path_for`` says "" for it) goes to a prefill instance as a one-token,
non-streamed request that also returns token ids; its answer is token 1 and the prompt's token
ids. The decode half is a completions request for the prompt's token ids plus token 1 (no
re-tokenization), with ``max_tokens`` one less and ``kv_tokens`` saying how many of them the
prefill's KV covers: decode loads that KV, computes token 1's own KV in its first step (as a
colocated instance would) and samples token 2. The client sees one answer: token 1 from the
prefill, tokens 2.. from the decode, ``usage``, ``logprobs`` and ``token_ids`` counted and
joined as a colocated instance gives them, in the client's format (chat answers are rebuilt
from the decode's completion events).

Requests this cannot answer exactly as colocated would take the old flow (decode recomputes
token 1); ``path_for`` gives the reason, and the README lists them. Pure functions: no I/O.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest.max_tokens when a request has none
# Structured output: the grammar would restart at token 2 on decode.
STRUCTURED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
# Chat request keys the decode's completions request takes as they are.
CHAT_TO_COMPLETIONS = (
    "model", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop",
    "stop_token_ids", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
    "spaces_between_special_tokens", "logit_bias", "allowed_token_ids", "user", "priority", "cache_salt",
    "stream", "stream_options", "request_id",
)
# Completions request keys the decode half must not have (it gets token ids and its own limits).
NOT_FOR_DECODE = ("prompt", "max_tokens", "max_completion_tokens", "min_tokens", "truncate_prompt_tokens",
                  "add_special_tokens", "return_token_ids", "stream_options")


def _int_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def _stops(body: dict) -> list[str]:
    s = body.get("stop")
    if isinstance(s, str):
        return [s] if s else []
    return [x for x in s if isinstance(x, str) and x] if isinstance(s, list) else []


def requested_tokens(body: dict) -> int | None:
    m = body.get("max_completion_tokens")
    return m if m is not None else body.get("max_tokens")


def several_sequences(endpoint: str, body: dict) -> str:
    """Why the request makes several sequences ("" if it makes one): ``n``/``best_of`` > 1, or a
    completions prompt that is a list of prompts. One pd_id cannot name their transfers (their
    chunks would collide), so such a request is answered by a decode instance alone."""
    for key in ("n", "best_of"):
        if body.get(key) not in (None, 1):
            return f"{key} > 1"
    p = body.get("prompt") if endpoint.endswith("/completions") and not endpoint.endswith("chat/completions") else None
    if isinstance(p, list) and p and not all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        return "several prompts"
    return ""


def path_for(endpoint: str, body: dict, chat: bool = True) -> str:
    """"" if the request's first token can come from the prefill; else why it takes the old flow.

    ``chat``: chat requests may take the path (False when the instances parse tool calls or
    reasoning out of the text, which a completions request for the decode half would not do).
    A body of unexpected shape takes the old flow: the instance says what is wrong with it.
    """
    try:
        return _path_for(endpoint, body, chat)
    except (TypeError, AttributeError, ValueError):
        return "malformed"


def _path_for(endpoint: str, body: dict, chat: bool) -> str:
    for key, why in (("n", "n > 1"), ("best_of", "best_of > 1")):
        if body.get(key) not in (None, 1):
            return why
    for key, why in (("use_beam_search", "beam search"), ("echo", "echo"), ("prompt_logprobs", "prompt_logprobs"),
                     ("bad_words", "bad_words"), ("logits_processors", "logits_processors"),
                     ("return_tokens_as_token_ids", "return_tokens_as_token_ids"),
                     ("logprob_token_ids", "logprob_token_ids"), ("prompt_embeds", "prompt_embeds"),
                     ("repetition_detection", "repetition_detection (it counts token 1 as output)")):
        if body.get(key):
            return why
    if body.get("seed") is not None:
        return "a seed (the old flow draws every token from one seeded generator, as colocated does)"
    if body.get("presence_penalty") or body.get("frequency_penalty"):
        return "presence/frequency penalties (they count token 1 as output)"
    if any(body.get(k) is not None for k in STRUCTURED) or (
            isinstance(body.get("response_format"), dict) and body["response_format"].get("type") not in (None, "text")):
        return "structured output"
    if not all(_int_or_none(body.get(k)) for k in ("max_tokens", "max_completion_tokens", "min_tokens")):
        return "max_tokens/min_tokens not integers (the instance says what is wrong)"
    mt, mn = requested_tokens(body), body.get("min_tokens") or 0
    if (mt is not None and mt < 1) or mn < 0 or (mt is not None and mn > mt):
        return "max_tokens/min_tokens out of range (the instance says what is wrong)"
    if mn and _stops(body):
        return "stop strings with min_tokens"
    opts = body.get("stream_options")
    if isinstance(opts, dict) and opts.get("continuous_usage_stats"):
        return "continuous_usage_stats"
    if endpoint == COMPLETIONS:
        p = body.get("prompt")
        if not (isinstance(p, str) or (isinstance(p, list) and p and all(_int_or_none(t) and t is not None for t in p))):
            return "a prompt list (several prompts)"
        return ""
    if not chat:
        return "chat on instances that parse tool calls or reasoning"
    if body.get("tools") or body.get("functions") or body.get("tool_choice") not in (None, "none", "auto"):
        return "tools"
    if body.get("logprobs"):
        return "chat logprobs"
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        return "malformed"
    for m in msgs:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, list) and any(not isinstance(p, dict) or p.get("type") != "text" for p in c):
            return "non-text message content"
    return ""


def _no_logprobs(body: dict) -> bool:
    v = body.get("logprobs")
    return v is None or v is False  # completions' 0 asks for them


def prefill_body(body: dict, pd_id: str, handoff: bool = False) -> dict:
    """The prefill half: token 1 and the prompt's token ids, not streamed, KV sent on as ``pd_id``;
    ``handoff``: its scheduler hands token 1 to the early decode (``pd.connector.handoff``), and the
    answer has token 1's own text (its logprobs entry: vLLM decodes each token alone there), asked
    for here if the client did not ask for logprobs (``parse_prefill`` then drops them)."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "min_tokens")}
    if handoff and _no_logprobs(body):
        out.update({"logprobs": True, "top_logprobs": 0} if "messages" in body else {"logprobs": 0})
    out.update(stream=False, max_tokens=1, return_token_ids=True,
               kv_transfer_params={"pd_id": pd_id, "do_remote_decode": True, **({"handoff": True} if handoff else {})})
    if "max_completion_tokens" in body:
        out["max_completion_tokens"] = 1
    if body.get("min_tokens"):
        out["min_tokens"] = 1  # no EOS or stop token for token 1 either
    return out


@dataclass
class First:
    """What the prefill answered: token 1, the prompt, and how its answer is shaped."""

    chat: bool
    answer: dict  # the prefill's whole answer
    text: str
    token_id: int
    prompt_ids: list[int]
    finish_reason: str | None
    logprobs: Any = None  # completions: the prefill's logprobs object (None unless asked)
    want_ids: bool = False  # the client asked for return_token_ids
    token_str: str | None = None  # token 1 decoded alone (its logprobs entry), when the answer had one

    @property
    def choice(self) -> dict:
        return self.answer["choices"][0]


def parse_prefill(endpoint: str, body: dict, data: bytes) -> First:
    """The prefill's answer; ValueError if it is not one choice with one token and the prompt ids."""
    ans = json.loads(data)
    ch = ans["choices"][0]
    chat = endpoint == CHAT
    prompt = ans.get("prompt_token_ids") if chat else ch.get("prompt_token_ids")
    ids = ch.get("token_ids")
    if not isinstance(prompt, list) or not isinstance(ids, list) or len(ids) != 1:
        raise ValueError(f"prefill answered without one token and the prompt's token ids: {str(ans)[:300]}")
    text = (ch.get("message") or {}).get("content") or "" if chat else ch.get("text") or ""
    token_str = _token_str(ch.get("logprobs"), chat)
    if _no_logprobs(body):  # asked for by the proxy only (prefill_body's token_text): not the client's
        ch["logprobs"] = None
    return First(chat, ans, text, ids[0], prompt, ch.get("finish_reason"), None if chat else ch.get("logprobs"),
                 bool(body.get("return_token_ids")), token_str)


def _token_str(lp: Any, chat: bool) -> str | None:
    """Token 1's own text from its logprobs entry (completions ``tokens``, chat ``content[].token``)."""
    try:
        s = lp["content"][0]["token"] if chat else lp["tokens"][0]
    except (TypeError, KeyError, IndexError):
        return None
    return s if isinstance(s, str) else None


def ends_at_token_1(body: dict, first: First, max_model_len: int | None = None) -> bool:
    """Token 1 ends the answer: EOS, a stop token or string, max_tokens 1, or the prompt filling the
    context but for one token (vLLM caps max_tokens there, whatever the request asked)."""
    if first.finish_reason != "length" or requested_tokens(body) == 1:
        return True
    return max_model_len is not None and len(first.prompt_ids) + 1 >= max_model_len


def decode_body(endpoint: str, body: dict, first: First, pd_id: str, max_model_len: int | None = None) -> dict:
    """The decode half: a completions request for prompt + token 1 (token ids), one token fewer.

    Without ``max_tokens`` the client gets vLLM's default for its endpoint: 16 tokens on
    completions (``CompletionRequest.max_tokens``, OpenAI's default), the context's end on chat
    (``max_model_len``, when known); the decode half, a completions request, is told so."""
    if endpoint == CHAT:
        out = {k: body[k] for k in CHAT_TO_COMPLETIONS if k in body}
    else:
        out = {k: v for k, v in body.items() if k not in NOT_FOR_DECODE}
    out["prompt"] = first.prompt_ids + [first.token_id]
    mt = requested_tokens(body)
    if mt is None:
        mt = (COMPLETIONS_DEFAULT_MAX_TOKENS if endpoint == COMPLETIONS else
              max_model_len - len(first.prompt_ids) if max_model_len else None)
    if mt is not None:
        out["max_tokens"] = mt - 1
    if (body.get("min_tokens") or 0) > 1:
        out["min_tokens"] = body["min_tokens"] - 1
    if body.get("logprobs") is None and hold_from(body, first.text, len(first.text)) < len(first.text):
        out["logprobs"] = 0  # each token's text: how many tokens a stop string across token 1 took
    # Streamed even for a client that is not: the proxy counts the tokens (usage after a stop it
    # finds) and puts the answer together.
    out.update(stream=True, stream_options={"include_usage": True}, return_token_ids=True)
    out["kv_transfer_params"] = {"pd_id": pd_id, "do_remote_prefill": True, "kv_tokens": len(first.prompt_ids)}
    return out


def _usage(first: First, n_decode: int) -> dict:
    p = first.answer.get("usage", {}).get("prompt_tokens", len(first.prompt_ids))
    return {"prompt_tokens": p, "total_tokens": p + 1 + n_decode, "completion_tokens": 1 + n_decode}


def _shift_offsets(lp: Any, by: int) -> Any:
    if isinstance(lp, dict) and isinstance(lp.get("text_offset"), list):
        lp = {**lp, "text_offset": [o + by for o in lp["text_offset"]]}
    return lp


def _offset_after(lp: Any) -> int:
    """Where text_offset continues after the prefill's token (vLLM counts the token strings)."""
    if isinstance(lp, dict) and lp.get("tokens"):
        return lp["text_offset"][-1] + len(lp["tokens"][-1] or "")
    return 0


def _join_logprobs(a: Any, b: Any) -> Any:
    """Completion logprobs ``a`` then ``b`` (b's text_offset already continue a's: decode_chunk shifted them)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return a if b is None else b
    return {k: (a.get(k) or []) + (b.get(k) or []) for k in ("text_offset", "token_logprobs", "tokens", "top_logprobs")}


def find_stop(body: dict, held: str, n_first: int) -> tuple[int, str] | None:
    """The earliest stop string in ``held`` that starts in its first ``n_first`` characters (the
    part that is token 1's): (where it starts, which one)."""
    best = None
    for s in _stops(body):
        i = held.find(s)
        if 0 <= i < n_first and (best is None or i < best[0]):
            best = (i, s)
    return best


def hold_from(body: dict, held: str, n_first: int) -> int:
    """Where, in ``held``, a stop string could still start within token 1's text and end in text
    not yet seen (len(held) if nowhere: nothing needs holding back)."""
    stops = _stops(body)
    for p in range(min(n_first, len(held))):
        tail = held[p:]
        if any(s.startswith(tail) and len(s) > len(tail) for s in stops):
            return p
    return len(held)


@dataclass
class StreamState:
    """A first-token answer being put together: the client's format, what is held back, what was counted."""

    first: First
    body: dict
    held: str = ""  # text not yet sent: a stop string may start in it
    n_first: int = 0  # characters at the start of ``held`` that are token 1's
    n_decode: int = 0  # decode tokens given to the client
    include_usage: bool = False
    ids: list[int] = field(default_factory=list)  # the decode's tokens so far
    max_model_len: int | None = None  # the decode instances' context length (None: unknown)
    ends: list[int] = field(default_factory=list)  # where each one's text ends (its logprobs token strings)

    def __post_init__(self):
        opts = self.body.get("stream_options")
        self.include_usage = bool(self.body.get("stream")) and isinstance(opts, dict) and bool(opts.get("include_usage"))


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunk(st: StreamState, text: str, finish: str | None = None, stop_reason: Any = None,
           logprobs: Any = None, token_ids: list[int] | None = None, prompt: bool = False) -> dict:
    a, f = st.first.answer, st.first
    obj = {"id": a["id"], "object": "chat.completion.chunk" if f.chat else "text_completion",
           "created": a["created"], "model": a["model"]}
    if f.chat:
        c: dict = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
    else:
        c = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
    if finish is not None:
        c["stop_reason"] = stop_reason
    if f.want_ids:
        if prompt and not f.chat:
            c["prompt_token_ids"] = f.prompt_ids
        c["token_ids"] = token_ids
        if prompt and f.chat:
            obj["prompt_token_ids"] = f.prompt_ids
    obj["choices"] = [c]
    return obj


def usage_chunk(st: StreamState) -> dict:
    a = st.first.answer
    return {"id": a["id"], "object": "chat.completion.chunk" if st.first.chat else "text_completion",
            "created": a["created"], "model": a["model"], "choices": [], "usage": _usage(st.first, st.n_decode)}


def opening(st: StreamState, ends: bool) -> list[dict]:
    """The chunks for token 1 (with ``ends``: the whole answer, usage included)."""
    f = st.first
    out = []
    if f.chat:
        role = _chunk(st, "")
        role["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        role["choices"][0].pop("token_ids", None)
        out.append(role)
    if ends:
        out.append(_chunk(st, f.text, f.finish_reason, f.choice.get("stop_reason"), f.logprobs, [f.token_id],
                          prompt=True))
        return out + ([usage_chunk(st)] if st.include_usage else [])
    cut = hold_from(st.body, f.text, len(f.text))
    st.held, st.n_first = f.text[cut:], len(f.text) - cut
    out.append(_chunk(st, f.text[:cut], logprobs=f.logprobs, token_ids=[f.token_id], prompt=True))
    return out


def parse_event(data: bytes) -> dict | str | None:
    """One SSE event's payload: its JSON object, "[DONE]", or None if it is neither."""
    payload = data[len(b"data:"):].strip() if data.startswith(b"data:") else b""
    if payload == b"[DONE]":
        return "[DONE]"
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def decode_chunk(st: StreamState, obj: dict) -> tuple[list[dict], bool]:
    """One decode event (a completion chunk) as the client's chunks, and whether the answer is
    over (at a stop string that starts in token 1's text, or the decode's usage after its end)."""
    if not obj.get("choices"):  # the usage event: the decode's answer is over
        return ([usage_chunk(st)] if st.include_usage else []), True
    c = obj["choices"][0]
    ids = c.get("token_ids") or []
    text, finish, stop_reason = c.get("text") or "", c.get("finish_reason"), c.get("stop_reason")
    raw = c.get("logprobs")
    lp = None if st.first.chat or st.body.get("logprobs") is None else (  # None: asked for by the proxy only
        _shift_offsets(raw, _offset_after(st.first.logprobs)))
    if st.n_first:
        st.ids += ids
        for t in (raw or {}).get("tokens") or ():
            st.ends.append((st.ends[-1] if st.ends else 0) + len(t or ""))
        held = st.held + text
        hit = find_stop(st.body, held, st.n_first)
        if hit is not None:
            i, s = hit
            # As colocated counts: up to the token whose text completed the stop string (the
            # decode may have held that text back into a later event).
            end = i + len(s) - st.n_first
            k = next((j + 1 for j, e in enumerate(st.ends) if e >= end), len(st.ids))
            new = st.ids[st.n_decode:k]
            st.n_decode = k
            keep = held[:i] + (s if st.body.get("include_stop_str_in_output") else "")
            out = [_chunk(st, keep, "stop", s, _first_tokens(lp, len(new)), new)]
            return out + ([usage_chunk(st)] if st.include_usage else []), True
    st.n_decode += len(ids)
    if st.n_first:
        cut = len(held) if finish is not None else hold_from(st.body, held, st.n_first)
        text, st.held, st.n_first = held[:cut], held[cut:], max(0, st.n_first - cut)
        if not st.n_first:
            text, st.held = text + st.held, ""
    return [_chunk(st, text, finish, stop_reason, lp, ids)], False


def _first_tokens(lp: Any, k: int) -> Any:
    if not isinstance(lp, dict):
        return lp
    return {key: v[:k] if isinstance(v, list) else v for key, v in lp.items()}


def collect(st: StreamState, chunks: list[dict]) -> dict:
    """The non-streamed answer from the chunks a streamed one would have had."""
    ans = json.loads(json.dumps(st.first.answer))
    ch = ans["choices"][0]
    text, lp, ids, finish, stop_reason = [], None, [], None, None
    for obj in chunks:
        for c in obj["choices"]:
            text.append((c.get("delta") or {}).get("content") or "" if st.first.chat else c.get("text") or "")
            lp = _join_logprobs(lp, c.get("logprobs"))
            ids += c.get("token_ids") or []
            if c.get("finish_reason") is not None:
                finish, stop_reason = c["finish_reason"], c.get("stop_reason")
    if st.first.chat:
        ch["message"]["content"] = "".join(text)
    else:
        ch["text"], ch["logprobs"] = "".join(text), lp
    ch["finish_reason"], ch["stop_reason"] = finish, stop_reason
    ch["token_ids"] = ids if st.first.want_ids else None
    ans["usage"] = _usage(st.first, st.n_decode)
    if st.first.chat:
        ans["prompt_token_ids"] = st.first.prompt_ids if st.first.want_ids else None
    else:
        ch["prompt_token_ids"] = st.first.prompt_ids if st.first.want_ids else None
    return ans
