"""The P/D flow whose first token comes from the prefill (``pd.proxy.first_token`` says which requests).

The prefill half runs first (one token, not streamed, with the prompt's token ids). If token 1
ends the answer it is the whole answer and the transfer is aborted (its KV is never loaded).
Otherwise the decode half is sent at once, as a streamed completions request for the prompt's
token ids plus token 1, and meanwhile a streaming client already gets token 1. The decode's
events are rewritten into the client's format (``first_token.decode_chunk``) as they come; a
client that did not stream gets the answer put together from them. A stop string that starts in
token 1's text and ends in the decode's is found here (the decode cannot see it) and ends the
answer, closing the decode request (vLLM aborts it).

Timeline events (``pd.proxy.timeline``): prefill_sent, prefill_answered, first_token (token 1
written to a streaming client), decode_sent, decode_first_byte (token 2's event, on this path),
last_token.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import ExitStack
from typing import AsyncIterator

import aiohttp
from aiohttp import web

from pd.proxy import first_token as ft
from pd.proxy.early import Differs, Early, early_body, early_event, greedy, handoff_allowed, handoff_event
from pd.proxy.routing import UpstreamError
from pd.proxy.routing import decode_body as old_flow_body

logger = logging.getLogger("pd.proxy")

SSE = "text/event-stream"
# How long the proxy waits for the prefill's FIRST once the prefill has answered (it is sent before
# the answer leaves: normally there already); past it the coordinator settles "the decode computes token 1".
HANDOFF_WAIT_S = 1.0
VETO = "veto"  # _outcome: token 1 was handed over, but the decode's answer from token 2 would not be colocated's
LOAD_WAIT_S = 10.0  # how long such an early decode is let run to its first event (its load done) before it is closed


# request key: the client had the whole answer before it went away
COMPLETE = web.RequestKey("pd_answer_complete", bool) if hasattr(web, "RequestKey") else "pd_answer_complete"


class ClientGone(Exception):
    """The client went away mid-stream (``response``: what it had been given)."""

    def __init__(self, response: web.StreamResponse):
        self.response = response


class NoDecode(Exception):
    """The answer needs no decode: ``response`` (the prefill failed), or token 1 ended it (``st``)."""

    def __init__(self, why: str, response: web.StreamResponse | None = None, st: ft.StreamState | None = None):
        super().__init__(why)
        self.why, self.response, self.st = why, response, st


class FirstTokenFlow:
    """Mixed into ``pd.proxy.relay.Relay``: uses its pools, metrics, timeline and upstream calls."""

    async def _pd_first(self, request: web.Request, endpoint: str, body: dict, t0: float,
                        pd_id: str) -> web.StreamResponse:
        headers = {"x-pd-id": pd_id}
        p_url = self.prefill.pick(body)  # before any decode half goes out (an empty pool: 503)
        with ExitStack() as tracked:
            tasks: list[asyncio.Task] = []  # the decode halves sent: discarded if the answer ends early
            early, d_url = self._send_early(request, endpoint, body, pd_id, tracked, tasks)
            try:
                st = await self._token_1(request, p_url, endpoint, body, pd_id, headers,
                                         handoff=early is not None and self._handoff())
            except BaseException as e:  # no decode: its halves sent are discarded, the transfer aborted
                self._discard(*tasks)
                self._abort(pd_id, e.why if isinstance(e, NoDecode) else "client went away")
                if not isinstance(e, NoDecode):
                    raise
                if e.response is not None:
                    return e.response
                return await self._answer(request, e.st, ft.opening(e.st, ends=True), headers, pd_id, t0)
            if not st.first.text:  # token 1 shows no text yet: the decode computes it (see _unshown_first)
                return await self._unshown_first(request, endpoint, body, pd_id, early, d_url, tracked, headers, t0)
            self.metrics.path("prefill")
            # How token 1 was handed to the early decode (asked at once, while the client gets token 1).
            offer = self._spawn(self._outcome(st, pd_id)) if early is not None and self._handoff() else None
            if offer is not None:
                tasks.append(offer)
            if early is None:
                d_url = self.decode.pick()
                tracked.enter_context(self.decode.track(d_url))
            opening = ft.opening(st, ends=False)
            chunks = (self._early_chunks(request, st, early, endpoint, d_url, pd_id, tasks, offer) if early is not None
                      else self._decode_chunks(st, self._sequential(request, st, endpoint, d_url, pd_id, tasks), pd_id))
            try:
                if body.get("stream"):
                    return await self._stream_first(request, st, opening, chunks, headers, pd_id, t0)
                return await self._whole_first(st, opening, chunks, headers, pd_id)
            except BaseException as e:
                if request.get(COMPLETE):  # it hung up after [DONE]: nothing was lost
                    raise
                self._discard(*tasks)
                self._abort(pd_id, "client went away" if isinstance(e, (asyncio.CancelledError, ClientGone))
                            else "proxy error")
                raise
            finally:
                await chunks.aclose()

    async def _token_1(self, request: web.Request, p_url: str, endpoint: str, body: dict, pd_id: str,
                       headers: dict, handoff: bool = False) -> ft.StreamState:
        """The prefill half's answer (from ``p_url``), token 1; ``NoDecode`` where the answer needs
        no decode (token 1 ended it) or the prefill failed."""
        try:
            data = await self._prefill(request, p_url, endpoint, ft.prefill_body(body, pd_id, handoff), pd_id)
        except UpstreamError as e:
            raise NoDecode("prefill failed", response=e.response(headers)) from None
        try:
            first = ft.parse_prefill(endpoint, body, data)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise NoDecode("prefill answer unusable", response=self._fail(
                "prefill", p_url, pd_id, 502, why=f"gave an answer the proxy cannot use: {e}").response(headers)) from None
        st = ft.StreamState(first, body, max_model_len=await self._max_model_len(request))
        if ft.ends_at_token_1(body, first, st.max_model_len):
            self.metrics.path("prefill_only")
            raise NoDecode("token 1 ended the answer: no decode", st=st)
        return st

    def _send_early(self, request: web.Request, endpoint: str, body: dict, pd_id: str, tracked: ExitStack,
                    tasks: list[asyncio.Task]) -> tuple[asyncio.Task | None, str]:
        """The early decode half (``pd.proxy.early``), for a greedy request with more than one
        token to give: (its task, its instance); (None, "") otherwise."""
        if not (self.early_decode in ("greedy", "greedy_recompute") and greedy(body) and ft.requested_tokens(body) != 1):
            return None, ""
        d_url = self.decode.pick()
        tracked.enter_context(self.decode.track(d_url))
        half = early_body(endpoint, body, pd_id, handoff=self._handoff())
        early = self._spawn(self._start(request, "decode", d_url, endpoint, half, pd_id))
        tasks.append(early)
        return early, d_url

    async def _unshown_first(self, request: web.Request, endpoint: str, body: dict, pd_id: str,
                             early: asyncio.Task | None, d_url: str, tracked: ExitStack, headers: dict,
                             t0: float) -> web.StreamResponse:
        """Token 1 has no text of its own yet (vLLM holds back part of a character, or the token shows
        none): the client is given nothing from the prefill, and the decode half takes the old flow (the
        client's request; the decode computes token 1 itself), its answer the client's whole answer.

        A decode request for prompt + token 1 would not do: vLLM 0.32 primes its detokenizer
        (tokenizers' ``DecodeStream``) with the request's prompt ids, and ids whose text ends inside a
        character leave it no prefix, so its first text would start at the prompt's start (2.8% of
        random 96- and 700-token prompts with a random token 1, with ``pd make-model``'s tokenizer; a
        soak saw the prompt's text in an answer). An early decode is let load first, then closed
        (``_let_load``): the decode request then finds the prompt's KV in that instance's prefix cache."""
        self.metrics.path("decode", "token 1 without text")
        half = old_flow_body(body, pd_id)
        try:
            if early is not None:
                loaded = await self._let_load(early, pd_id)
                self._early_outcome(pd_id, "unshown")
                self._abort(pd_id, "token 1 without text", later_s=0.0 if loaded else LOAD_WAIT_S)
                del half["kv_transfer_params"]
            else:
                d_url = self.decode.pick()
                tracked.enter_context(self.decode.track(d_url))
            started = await self._start(request, "decode", d_url, endpoint, half, pd_id)
        except UpstreamError as e:
            self._abort(pd_id, f"decode failed ({e.status})")
            return e.response(headers)
        except BaseException:  # the client went away before the decode answered
            if early is not None:
                self._discard(early)
            self._abort(pd_id, "client went away")
            raise
        try:
            return await self._relay(request, started, headers, pd_id, "decode", t0)
        except BaseException:  # _relay closed the decode's answer (vLLM aborts it)
            if started.complete:  # it hung up after [DONE]: nothing was lost
                request[COMPLETE] = True
            else:
                self._abort(pd_id, "client went away")
            raise

    def _sequential(self, request: web.Request, st: ft.StreamState, endpoint: str, d_url: str, pd_id: str,
                    tasks: list[asyncio.Task], kv: bool = True) -> asyncio.Task:
        """The decode half after the prefill: prompt + token 1 (``kv``: loading the prompt's KV as ``pd_id``)."""
        body = ft.decode_body(endpoint, st.body, st.first, pd_id, st.max_model_len)
        if not kv:
            del body["kv_transfer_params"]
        task = self._spawn(self._start(request, "decode", d_url, ft.COMPLETIONS, body, pd_id))
        tasks.append(task)
        return task

    def _handoff(self) -> bool:
        """The prefill hands token 1 to early decodes (``early_decode: greedy`` and a coordinator to hand it through)."""
        return self.early_decode == "greedy" and self.coord is not None

    async def _outcome(self, st: ft.StreamState, pd_id: str) -> bool | str | None:
        """How the coordinator settled token 1's hand-off (``pd.coordinator.first``): True when the
        early decode's answer starts at token 2, False when it computes token 1, None when that is
        unknown (no answer), ``VETO`` when it was handed over but must not be used: a token other
        than the prefill's answer's, or one whose text the decode's server would give otherwise
        (``early.handoff_allowed``)."""
        token = await self.coord.first_outcome(pd_id, HANDOFF_WAIT_S)
        if token is None or token < 0:
            return None if token is None else False
        self.timeline.mark(pd_id, "first_handed")
        if token != st.first.token_id or not handoff_allowed(st):
            logger.info("pd_id=%s: token 1 was handed to the early decode, but its answer from token 2 would not be "
                        "colocated's (%s); not used", pd_id, "another token" if token != st.first.token_id
                        else "token 1's text, or a stop string that may begin in it")
            return VETO
        return True

    async def _let_load(self, early: asyncio.Task, pd_id: str) -> bool:
        """Let a handed early decode that will not be used run to its first event, then close it: it
        is loading the transfer's KV within an engine step, and closed before that step vLLM may
        drop it with the blocks in its prefix cache unwritten (the decode after the prefill, on
        the same instance, would read them); its DONE frees the chunks (the abort that follows
        frees what the coordinator still holds, should it have ended before loading). True when
        its first event came (its load is over)."""
        started = None
        try:
            started = await asyncio.wait_for(asyncio.shield(early), LOAD_WAIT_S)
            if started.stream:
                events = self._decode_events(started, pd_id)
                try:
                    await asyncio.wait_for(events.__anext__(), LOAD_WAIT_S)
                    return True
                finally:
                    await events.aclose()
        except (asyncio.TimeoutError, StopAsyncIteration, UpstreamError, aiohttp.ClientError, OSError) as e:
            logger.info("pd_id=%s: the early decode not used ended before its first event (%r)", pd_id, e)
        finally:
            if started is not None:
                started.resp.close()
        return False

    async def _early_chunks(self, request: web.Request, st: ft.StreamState, early: asyncio.Task, endpoint: str,
                            d_url: str, pd_id: str, tasks: list[asyncio.Task],
                            offer: asyncio.Task | None = None) -> AsyncIterator[dict]:
        """The client's chunks for tokens 2.. from the early decode (``pd.proxy.early``): handed token 1
        (``offer``), or checked against it; if its token 1 differs, it fails before it or the hand-off's
        outcome is unknown, from a decode request after the prefill instead (on the same instance,
        whose prefix cache may hold the prompt's KV now)."""
        e, given, started, done, handed, loaded = Early.after_opening(st), False, None, False, False, True
        try:
            handed = await offer if offer is not None else False
            if handed is None or handed == VETO:  # it may be loading the transfer: let it, then close it
                loaded = await self._let_load(early, pd_id)
                raise Differs("token 1's hand-off is unknown" if handed is None else
                              "token 1 was handed over, but the decode's answer from token 2 would not be colocated's")
            event = handoff_event if handed else early_event
            started = await early
            if not started.stream:
                raise UpstreamError(started.resp.status, started.first, started.resp.content_type)
            async for obj in self._decode_events(started, pd_id):
                for c in event(e, obj)[0]:
                    if not given:
                        given = True
                        self.timeline.mark(pd_id, "token_2")
                    yield c
            done = True
            self._early_outcome(pd_id, "handed" if handed else "used")
            self.timeline.mark(pd_id, "last_token")
            return
        except (Differs, UpstreamError) as err:
            if given:  # the client has part of this answer: it ends with an error event
                self._early_outcome(pd_id, "failed")
                if isinstance(err, UpstreamError):
                    raise
                raise self._fail("decode", d_url, pd_id, 502, why=f"answered inconsistently: {err}") from None
            outcome, why = ("differed", str(err)) if isinstance(err, Differs) else ("failed", f"answered {err.status}")
        finally:
            if started is not None:
                started.resp.release() if done else started.resp.close()  # closing aborts it in vLLM
            elif not done:
                self._discard(early)  # not used: cancelled, or its answer closed (vLLM aborts it)
        self._early_outcome(pd_id, outcome)
        logger.info("pd_id=%s: early decode not used (%s); sending the decode request after the prefill", pd_id, why)
        # (A vetoed one, or one whose hand-off is unknown (it may have been handed token 1 by a
        # coordinator that restarted since), was let load first: its DONE freed what it read; the abort drops what is
        # left at the coordinator: its entry, when the decode ended before loading. One that gave no
        # first event in LOAD_WAIT_S may be loading still, in a long step: its abort waits as long again.)
        self._abort(pd_id, "early decode not used", later_s=0.0 if loaded else LOAD_WAIT_S)
        async for c in self._decode_chunks(st, self._sequential(request, st, endpoint, d_url, pd_id, tasks, kv=False),
                                           pd_id):
            yield c

    def _early_outcome(self, pd_id: str, outcome: str) -> None:
        """What became of the early decode (handed, used, differed, failed): counted, and marked in
        the request's timeline as ``early_<outcome>`` (which path an answer took)."""
        self.metrics.early(outcome)
        self.timeline.mark(pd_id, f"early_{outcome}")

    async def _max_model_len(self, request: web.Request) -> int | None:
        """The model's context length, from a decode instance's /v1/models (asked once; None if
        it does not say)."""
        if not hasattr(self, "_model_len"):
            self._model_len: int | None = None
            try:
                async with self.session.get(self.decode.urls[0] + "/v1/models", headers=self._headers(request),
                                            timeout=aiohttp.ClientTimeout(total=10)) as r:
                    data = (await r.json())["data"] if r.status == 200 else []
                self._model_len = next((int(m["max_model_len"]) for m in data if m.get("max_model_len")), None)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError, TypeError) as e:
                del self._model_len  # asked again next time
                logger.info("no max_model_len from %s/v1/models: %r", self.decode.urls[0], e)
                return None
        return self._model_len

    async def _answer(self, request: web.Request, st: ft.StreamState, chunks: list[dict], headers: dict,
                      pd_id: str, t0: float) -> web.StreamResponse:
        """The whole answer from ``chunks`` (token 1 ended it)."""
        self.timeline.mark(pd_id, "first_token")
        self.timeline.mark(pd_id, "last_token")
        if not st.body.get("stream"):
            return web.json_response(ft.collect(st, chunks), headers=headers)
        out = await self._open_stream(request, headers, t0)
        await self._write(out, b"".join(ft.sse(c) for c in chunks) + b"data: [DONE]\n\n", request, True)
        await out.write_eof()
        return out

    async def _open_stream(self, request: web.Request, headers: dict, t0: float) -> web.StreamResponse:
        out = web.StreamResponse(status=200, headers={**headers, "Content-Type": SSE, "Cache-Control": "no-cache"})
        await out.prepare(request)
        self.metrics.ttft(time.monotonic() - t0)
        return out

    @staticmethod
    async def _write(out: web.StreamResponse, data: bytes, request: web.Request, complete: bool = False) -> None:
        try:
            await out.write(data)
        except ConnectionError:  # ConnectionResetError, aiohttp's ClientConnectionResetError
            raise ClientGone(out) from None
        if complete:
            request[COMPLETE] = True

    async def _decode_events(self, started, pd_id: str) -> AsyncIterator[dict]:
        """The decode's SSE events (JSON objects) until its ``[DONE]``; UpstreamError if it fails."""
        buf = started.first
        while True:
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                obj = ft.parse_event(event.strip())
                if obj == "[DONE]":
                    return
                if obj is None or "choices" not in obj:  # vLLM's error event mid-stream
                    raise UpstreamError(500, event.strip()[len(b"data:"):].strip() or b"{}")
                yield obj
            try:
                more = await started.resp.content.readany()
            except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as e:
                timeout = isinstance(e, asyncio.TimeoutError)
                raise self._fail("decode", str(started.resp.url.origin()), pd_id, 504 if timeout else 502,
                                 why="timed out mid-stream" if timeout else f"failed mid-stream: {e!r}") from None
            if not more:
                raise self._fail("decode", str(started.resp.url.origin()), pd_id, 502,
                                 why="ended its answer without [DONE]")
            buf += more

    async def _decode_chunks(self, st: ft.StreamState, decode: asyncio.Task, pd_id: str) -> AsyncIterator[dict]:
        """The client's chunks for tokens 2..; UpstreamError if the decode fails."""
        started = await decode
        if not started.stream:
            raise UpstreamError(started.resp.status, started.first, started.resp.content_type)
        done = False
        try:
            async for obj in self._decode_events(started, pd_id):
                chunks, over = ft.decode_chunk(st, obj)
                for c in chunks:
                    self.timeline.mark(pd_id, "token_2")
                    yield c
                if over and obj.get("choices"):  # a stop string the proxy found: the decode stops here
                    break
            else:
                done = True
        finally:
            started.resp.release() if done else started.resp.close()  # closing aborts it in vLLM
        self.timeline.mark(pd_id, "last_token")

    async def _whole_first(self, st: ft.StreamState, opening: list[dict], chunks: AsyncIterator[dict],
                           headers: dict, pd_id: str) -> web.StreamResponse:
        chunks_so_far = list(opening)
        try:
            async for c in chunks:
                chunks_so_far.append(c)
        except UpstreamError as e:
            self._abort(pd_id, f"decode failed ({e.status})")
            return e.response(headers)
        return web.json_response(ft.collect(st, chunks_so_far), headers=headers)

    async def _stream_first(self, request: web.Request, st: ft.StreamState, opening: list[dict],
                            chunks: AsyncIterator[dict], headers: dict, pd_id: str, t0: float) -> web.StreamResponse:
        out = await self._open_stream(request, headers, t0)
        await self._write(out, b"".join(ft.sse(c) for c in opening), request)
        self.timeline.mark(pd_id, "first_token")
        try:
            async for c in chunks:
                await self._write(out, ft.sse(c), request)
        except UpstreamError as e:
            self._abort(pd_id, f"decode failed ({e.status})")
            try:
                await out.write(b"data: " + e.body + b"\n\n")
                await out.write_eof()
            except ConnectionError:
                pass
            return out
        await self._write(out, b"data: [DONE]\n\n", request, complete=True)
        try:
            await out.write_eof()
        except ConnectionError:
            pass
        return out
