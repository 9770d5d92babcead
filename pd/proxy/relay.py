"""The proxy's generation routes: each request split into its prefill and decode halves, the answer relayed.

P/D mode: each request gets a ``pd_id`` (header ``x-pd-id`` on the answer). Most take the
first-token path (``relay_first``: token 1 from the prefill, the decode continues from it); the
rest (``first_token.path_for`` says why) take the old flow here: the prefill half
(``max_tokens=1``, not streamed) goes to a prefill instance and the decode half to a decode
instance, both at once (decode waits for the KV at the coordinator, recomputes the prompt's last
token and samples token 1 itself), and the client gets the decode's answer unchanged. A prefill that fails before the decode answer has begun cancels
decode and its error is returned; a decode error is returned as is; either aborts the transfer at
the coordinator, and so does a client that goes away (both halves are cancelled: closing the
upstream connection makes vLLM abort the request).

Colocated mode: each request goes unchanged to one instance (the baseline for benchmarks).

A request whose connection an instance drops before any answer (it closed a kept-alive
connection under it, e.g. waking from a stall) is sent once more on a new connection.
``upstream_timeout_s`` bounds every wait for an upstream's next bytes (the whole answer when not
streamed); running past it gives 504. See docs/design.md.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Coroutine

import aiohttp
from aiohttp import web

if sys.version_info >= (3, 11):
    from asyncio import timeout as deadline
else:  # aiohttp's own dependency there
    from async_timeout import timeout as deadline

from pd.config import ProxyConfig
from pd.coordinator.timeline import wall_ms
from pd.proxy import first_token as ft
from pd.proxy.listen import answer_and_close
from pd.proxy.metrics import ProxyMetrics
from pd.proxy.relay_first import COMPLETE, SSE, FirstTokenFlow
from pd.proxy.relay_first import ClientGone as _ClientGone
from pd.proxy.routing import (
    Pool,
    UpstreamError,
    client_transfer_params,
    decode_body,
    error_body,
    json_error,
    prefill_body,
)
from pd.proxy.timeline import ProxyTimeline

logger = logging.getLogger("pd.proxy")
DONE_EVENT = b"data: [DONE]"


def _finished(task: asyncio.Task) -> bool:
    """``task`` (a decode start) gave an answer the client has had to its end."""
    return (task.done() and not task.cancelled() and task.exception() is None
            and isinstance(task.result(), _Started) and task.result().complete)



MAX_JSON_ITEMS = 1 << 20  # JSON objects, arrays and elements a request body may hold
PARSE_OFF_LOOP = 1 << 20  # bodies larger than this are parsed off the event loop


class BodyTooComplex(ValueError):
    """A body whose parsed form would cost far more memory than its bytes."""


class BodyTooSlow(ValueError):
    """A body that did not arrive in the time allowed."""


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; give a finite number")


def _loads(raw: bytes):
    return json.loads(raw, parse_constant=_refuse_constant)


async def read_json(request: web.Request, timeout_s: float):
    """The request's JSON body, bounded before it is parsed: at most ``client_max_size`` bytes
    (HTTPRequestEntityTooLarge), all of them within ``timeout_s`` (BodyTooSlow: a client, even
    one with the key, trickling a body held its connection for ever), and ``MAX_JSON_ITEMS``
    objects, arrays and elements (BodyTooComplex: a 63 MB body of ``[{},{},...]`` parsed into
    2 GB); large bodies are parsed on a thread so the event loop keeps serving; NaN and Infinity
    are refused (ValueError)."""
    try:
        async with deadline(timeout_s):  # (no task of its own, unlike wait_for before 3.12)
            raw = await request.read()
    except asyncio.TimeoutError:
        raise BodyTooSlow(f"request body not received within {timeout_s:g} s (proxy.body_timeout_s)") from None
    items = raw.count(b"{") + raw.count(b"[") + raw.count(b",")
    if items > MAX_JSON_ITEMS:
        raise BodyTooComplex(f"request body has {items} JSON objects, arrays and elements; allowed at most "
                             f"{MAX_JSON_ITEMS}")
    if len(raw) > PARSE_OFF_LOOP:
        return await asyncio.get_running_loop().run_in_executor(None, _loads, raw)
    return _loads(raw)


@dataclass
class _Started:
    """A decode (or colocated) answer that has begun: its response and first bytes (or whole body)."""

    resp: aiohttp.ClientResponse
    first: bytes
    stream: bool
    complete: bool = False  # the client has had the whole answer (its ``data: [DONE]``)


class Relay(FirstTokenFlow):
    """``handle_generate`` and the upstream calls behind it; ``server.Proxy`` is one, with the app.

    What it uses of the proxy: the pools, the metrics, the HTTP session (made at startup), the
    coordinator client (None: no aborts), the bearer token for the instances and the timeline
    (each P/D request's events: a few clock reads, no I/O).
    """

    mode: str
    cfg: ProxyConfig
    prefill: Pool
    decode: Pool
    metrics: ProxyMetrics
    session: aiohttp.ClientSession | None
    coord: Any
    upstream_token: str | None
    api_key: str | None  # the key clients send the proxy (None: none); never passed upstream
    first_token: str  # "prefill": token 1 from the prefill where first_token.path_for allows; "decode": never
    chat_first_token: bool  # chat requests may take that path (not when the instances parse tools/reasoning)
    early_decode: str  # "greedy": a greedy request's decode half goes out with its prefill half; "never"
    timeline: ProxyTimeline
    abort_grace_s: float = 2.0  # how long after giving a transfer up the proxy aborts it (``_abort``)
    _tasks: set[asyncio.Task]

    def _spawn(self, coro: Coroutine) -> asyncio.Task:
        """A task kept alive until done, its exception always retrieved (no 'never retrieved' noise)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: (self._tasks.discard(t), t.cancelled() or t.exception()))
        return task

    def _headers(self, request: web.Request) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.upstream_token is not None:
            h["Authorization"] = f"Bearer {self.upstream_token}"
        elif "Authorization" in request.headers and self.api_key is None:
            # (a client's token is passed on only when it is not the proxy's own key)
            h["Authorization"] = request.headers["Authorization"]
        return h

    def _abort(self, pd_id: str | None, reason: str, later_s: float = 0.0) -> None:
        """Abort ``pd_id`` at the coordinator, in the background (it must survive our cancellation),
        ``abort_grace_s`` from now: the abort frees the transfer's chunks, and a decode may be
        loading them within an engine step right now (a synchronous load, after its published
        check). Freed under it, that load fails after vLLM has put the blocks in its prefix cache,
        and when the request is gone (its client too) nothing recomputes them: a later request with
        the same prefix on that instance would read garbage (seen on vLLM 0.32, issue 16's tests).
        The decode request itself is closed at once (vLLM aborts it). ``later_s``: a longer wait."""
        if pd_id is None:
            return
        wait_s = self.abort_grace_s + later_s
        logger.info("pd_id=%s: aborting the transfer in %g s (%s)", pd_id, wait_s, reason)
        if self.coord is not None:
            self._spawn(self._abort_later(pd_id, reason, wait_s))

    async def _abort_later(self, pd_id: str, reason: str, wait_s: float) -> None:
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        await self.coord.abort(pd_id, reason)

    def _fail(self, role: str, url: str, pd_id: str | None, status: int, body: bytes | None = None,
              content_type: str = "application/json", why: str = "") -> UpstreamError:
        """Count and log an upstream failure; the error to relay (ours when ``body`` is None)."""
        self.metrics.upstream_error(role)
        logger.warning("pd_id=%s: %s %s %s", pd_id or "-", role, url, why or f"answered {status}")
        if body is None:
            body = json.dumps(error_body(f"{role} instance {url} {why}", status, "upstream_error")).encode()
        return UpstreamError(status, body, content_type)

    # ---- generation --------------------------------------------------------------------

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions and /v1/chat/completions."""
        endpoint, t0 = request.path, time.monotonic()
        status = 499  # stays so if we are cancelled (the client went away)
        try:
            try:
                body = await read_json(request, self.cfg.body_timeout_s)
            except BodyTooSlow as e:
                status = 408
                return await answer_and_close(request, json_error(str(e), 408))
            except BodyTooComplex as e:
                status = 413
                return json_error(str(e), 413)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
                status = 400
                return json_error(f"request body is not valid JSON: {e}", 400)
            except RecursionError:
                status = 400
                return json_error("request body is not valid JSON: nested too deeply", 400)
            except web.HTTPRequestEntityTooLarge:
                status = 413
                return json_error(f"request body is larger than the {request.client_max_size} bytes allowed", 413)
            if not isinstance(body, dict):
                status = 400
                return json_error("request body must be a JSON object", 400)
            refused = client_transfer_params(body)
            if refused:
                status = 400
                return json_error(refused, 400)
            try:
                if self.mode == "pd":
                    resp = await self._pd(request, endpoint, body, t0)
                else:
                    resp = await self._colocated(request, endpoint, body, t0)
            except _ClientGone as gone:  # mid-stream: the response had begun, status stays 499
                return gone.response
            status = resp.status
            return resp
        finally:
            self.metrics.request(endpoint, 200 if request.get(COMPLETE) else status, time.monotonic() - t0)

    async def _pd(self, request: web.Request, endpoint: str, body: dict, t0: float) -> web.StreamResponse:
        several = ft.several_sequences(endpoint, body)
        if several:  # a decode instance computes it all: no transfer, no pd_id to share
            self.metrics.path("decode_only", several)
            return await self._colocated(request, endpoint, body, t0)
        pd_id = uuid.uuid4().hex
        self.timeline.start(pd_id, wall_ms() - (time.monotonic() - t0) * 1e3)
        why = ft.path_for(endpoint, body, self.chat_first_token) if self.first_token == "prefill" else "configured"
        if not why:
            return await self._pd_first(request, endpoint, body, t0, pd_id)
        self.metrics.path("decode", why)
        p_url, d_url = self.prefill.pick(body), self.decode.pick()
        headers = {"x-pd-id": pd_id}
        logger.debug("pd_id=%s: %s prefill=%s decode=%s stream=%s", pd_id, endpoint, p_url, d_url,
                     bool(body.get("stream")))
        with self.decode.track(d_url):
            prefill = self._spawn(self._prefill(request, p_url, endpoint, prefill_body(body, pd_id), pd_id))
            decode = self._spawn(self._start(request, "decode", d_url, endpoint, decode_body(body, pd_id), pd_id))
            try:
                pending = {prefill, decode}
                while not decode.done():
                    _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    if prefill.done() and not decode.done() and prefill.exception() is not None:
                        err = prefill.exception()
                        if not isinstance(err, UpstreamError):
                            raise err
                        self._discard(decode)
                        self._abort(pd_id, "prefill failed before decode answered")
                        return err.response(headers)
                try:
                    started = decode.result()
                except UpstreamError as e:
                    prefill.cancel()
                    self._abort(pd_id, f"decode failed ({e.status})")
                    return e.response(headers)
                prefill.add_done_callback(lambda t: self._late_prefill(t, pd_id))
                return await self._relay(request, started, headers, pd_id, "decode", t0)
            except BaseException as e:  # the client went away (or a bug: aiohttp answers 500)
                if _finished(decode):  # it hung up after [DONE]: the answer was whole, the KV consumed
                    logger.debug("pd_id=%s: client closed after the end of the answer", pd_id)
                    request[COMPLETE] = True
                    raise
                gone = isinstance(e, (asyncio.CancelledError, _ClientGone))
                if not isinstance(e, _ClientGone):  # that one was logged where it was noticed
                    logger.info("pd_id=%s: %s", pd_id, "client went away" if gone else f"failed: {e!r}")
                self._discard(prefill, decode)
                self._abort(pd_id, "client went away" if gone else "proxy error")
                raise

    def _late_prefill(self, task: asyncio.Task, pd_id: str) -> None:
        """Prefill failed after decode began answering: decode must stop waiting for that KV."""
        if not task.cancelled() and task.exception() is not None:
            self._abort(pd_id, "prefill failed after decode began answering")

    @staticmethod
    def _discard(*tasks: asyncio.Task) -> None:
        """Cancel upstream tasks; close a decode answer that has already begun."""
        for t in tasks:
            if not t.done():
                t.cancel()
            elif not t.cancelled() and t.exception() is None and isinstance(t.result(), _Started):
                t.result().resp.close()

    async def _colocated(self, request: web.Request, endpoint: str, body: dict, t0: float) -> web.StreamResponse:
        url = self.decode.pick(body)  # colocated: prefix affinity too (prefix policy)
        with self.decode.track(url):
            try:
                started = await self._start(request, "colocated", url, endpoint, body, None)
            except UpstreamError as e:
                return e.response({})
            try:
                return await self._relay(request, started, {}, None, "colocated", t0)
            except BaseException:
                if started.complete:
                    request[COMPLETE] = True
                raise

    async def _post(self, request: web.Request, role: str, url: str, endpoint: str, body: dict,
                    pd_id: str | None) -> aiohttp.ClientResponse:
        """POST ``body``; once more on a new connection when the instance dropped the connection
        before any answer (a kept-alive connection it closed under the request, e.g. after a stall:
        vLLM never saw that request)."""
        try:
            return await self.session.post(url + endpoint, json=body, headers=self._headers(request))
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            if not (isinstance(e, aiohttp.ServerDisconnectedError) or e.errno in (errno.ECONNRESET, errno.EPIPE)):
                raise
            self.metrics.upstream_retry(role)
            logger.info("pd_id=%s: %s %s dropped the connection before answering (%s); sending again on a new "
                        "connection", pd_id or "-", role, url, e)
        return await self.session.post(url + endpoint, json=body, headers=self._headers(request))

    async def _prefill(self, request: web.Request, url: str, endpoint: str, body: dict, pd_id: str) -> bytes:
        """Run the prefill half to its end, its answer; raise UpstreamError if it fails."""
        with self.prefill.track(url):
            try:
                self.timeline.mark(pd_id, "prefill_sent")
                r = await self._post(request, "prefill", url, endpoint, body, pd_id)
                try:
                    data = await r.read()
                finally:
                    r.release()
                self.timeline.mark(pd_id, "prefill_answered")
            except asyncio.TimeoutError:
                raise self._fail("prefill", url, pd_id, 504, why="timed out") from None
            except (aiohttp.ClientError, OSError) as e:
                raise self._fail("prefill", url, pd_id, 502, why=f"unreachable: {e}") from None
            if r.status >= 400:
                raise self._fail("prefill", url, pd_id, r.status, data, r.content_type)
            logger.debug("pd_id=%s: prefill %s done", pd_id, url)
            return data

    async def _start(self, request: web.Request, role: str, url: str, endpoint: str, body: dict,
                     pd_id: str | None) -> _Started:
        """Send ``body`` to ``url`` and wait until its answer begins (SSE) or is complete (otherwise)."""
        r = None
        try:
            self.timeline.mark(pd_id, "decode_sent")
            r = await self._post(request, role, url, endpoint, body, pd_id)
            if r.status >= 400 or r.content_type != SSE:
                data = await r.read()  # read to the end: the connection goes back to the pool
                if r.status >= 400:
                    raise self._fail(role, url, pd_id, r.status, data, r.content_type)
                self.timeline.mark(pd_id, "decode_first_byte")
                return _Started(r, data, stream=False)
            first = await r.content.readany()
            self.timeline.mark(pd_id, "decode_first_byte")
            return _Started(r, first, stream=True)
        except UpstreamError:
            raise
        except BaseException as e:
            if r is not None:
                r.close()
            if isinstance(e, asyncio.TimeoutError):
                raise self._fail(role, url, pd_id, 504, why="timed out") from None
            if isinstance(e, (aiohttp.ClientError, OSError)):
                raise self._fail(role, url, pd_id, 502, why=f"unreachable: {e}") from None
            raise

    async def _relay(self, request: web.Request, st: _Started, headers: dict[str, str], pd_id: str | None,
                     role: str, t0: float) -> web.StreamResponse:
        """Give the client the answer that began in ``st``, streaming the rest as it arrives."""
        if not st.stream:
            self.timeline.mark(pd_id, "last_token")
            return web.Response(status=st.resp.status, body=st.first, content_type=st.resp.content_type,
                                headers=headers)
        done = False
        try:
            out = web.StreamResponse(status=st.resp.status,
                                     headers={**headers, "Content-Type": SSE, "Cache-Control": "no-cache"})
            await out.prepare(request)
            self.metrics.ttft(time.monotonic() - t0)
            chunk, tail = st.first, b""
            while chunk:
                try:
                    await out.write(chunk)
                except ConnectionError:  # ConnectionResetError, aiohttp's ClientConnectionResetError
                    if st.complete:  # the client hung up after [DONE]: nothing was lost
                        return out
                    logger.info("pd_id=%s: client went away mid-stream", pd_id or "-")
                    raise _ClientGone(out) from None
                tail = (tail + chunk)[-len(DONE_EVENT) - 8:]  # [DONE] may straddle two reads
                st.complete = st.complete or DONE_EVENT in tail
                try:
                    chunk = await st.resp.content.readany()
                except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as e:
                    if st.complete:  # the upstream's connection ended badly after a whole answer
                        break
                    timeout = isinstance(e, asyncio.TimeoutError)
                    err = self._fail(role, str(st.resp.url.origin()), pd_id, 504 if timeout else 502,
                                     why="timed out mid-stream" if timeout else f"failed mid-stream: {e!r}")
                    self._abort(pd_id, f"{role} failed mid-stream")
                    await self._write_quietly(out, b"data: " + err.body + b"\n\n")
                    return out
            done = True
            self.timeline.mark(pd_id, "last_token")
            try:
                await out.write_eof()
            except ConnectionError:
                if not st.complete:
                    raise _ClientGone(out) from None
            return out
        finally:
            st.resp.release() if done else st.resp.close()

    @staticmethod
    async def _write_quietly(out: web.StreamResponse, data: bytes) -> None:
        try:
            await out.write(data)
            await out.write_eof()
        except ConnectionError:
            pass
