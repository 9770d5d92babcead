"""A test double of a vLLM OpenAI server's request handling, for fuzzing the proxy in front of it.

Requests are validated by vLLM's own request models (``CompletionRequest``,
``ChatCompletionRequest``), so a body vLLM would refuse is refused here with vLLM's status and
error shape (400 ``BadRequestError``; 404 ``NotFoundError`` for a model it does not serve);
only the engine is missing: a valid request gets a short canned answer shaped as vLLM shapes it
(token ids when asked, usage, SSE when streamed). It records every body it accepted or refused, for checks on what the proxy sent on.
"""
from __future__ import annotations

import json

from aiohttp import web

SERVED = "m"


def _vllm_models():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}


def _refusals() -> tuple[type, ...]:
    """What vLLM's server answers 400 for when it validates a request."""
    import pydantic
    from vllm.exceptions import VLLMClientError

    return pydantic.ValidationError, VLLMClientError, ValueError, TypeError


def _error(message: str, status: int, typ: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": typ, "param": None, "code": status}},
                             status=status)


def _logprobs_maker(req, chat: bool):
    """``lp(ids, offset)``: the logprobs object vLLM gives for these tokens when the request asks for
    logprobs (each token's text is " w<id>", decoded alone), else None."""
    asked = bool(req.logprobs) if chat else req.logprobs is not None

    def lp(ids: list[int], offset: int):
        if not asked:
            return None
        if chat:
            return {"content": [{"token": f" w{i}", "logprob": -0.5, "bytes": list(f" w{i}".encode()),
                                 "top_logprobs": []} for i in ids]}
        return {"text_offset": [offset + 3 * k for k in range(len(ids))], "tokens": [f" w{i}" for i in ids],
                "token_logprobs": [-0.5] * len(ids), "top_logprobs": [{f" w{i}": -0.5} for i in ids]}
    return lp


class VllmHttpDouble:
    def __init__(self, name: str):
        self.name = name
        self.url = ""
        self.bodies: list[dict] = []
        self.max_model_len = 2048  # what /v1/models says, as vLLM's model card does
        self.first = 7  # the first answer token's id
        self.unshown: set[int] = set()  # tokens whose text vLLM would show as "" (part of a character)
        self._models = _vllm_models()
        self._refusals = _refusals()

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except ValueError as e:
            return _error(f"invalid JSON: {e}", 400, "BadRequestError")
        if isinstance(body, dict):
            self.bodies.append(body)
        try:
            req = self._models[request.path].model_validate(body)
        except self._refusals as e:
            return _error(str(e)[:500], 400, "BadRequestError")
        if req.model not in (None, SERVED):
            return _error(f"The model `{req.model}` does not exist.", 404, "NotFoundError")
        return await self._answer(request, req, request.path == "/v1/chat/completions")

    def _text(self, i: int) -> str:
        return "" if i in self.unshown else f" w{i}"

    async def _answer(self, request: web.Request, req, chat: bool) -> web.StreamResponse:
        """Tokens 7, 8, .. (``first`` on; text " w7", " w8", ..) up to max_tokens (at most 3), shaped as vLLM
        shapes them: token ids when asked (``return_token_ids``), usage, SSE when streamed."""
        prompt = req.prompt if not chat and isinstance(req.prompt, list) and all(
            isinstance(t, int) for t in req.prompt) else [1, 2, 3]
        n = min(req.max_tokens or 3, 3) if not chat else min(req.max_completion_tokens or req.max_tokens or 3, 3)
        ids = list(range(self.first, self.first + n))
        want = bool(req.return_token_ids)
        lp = _logprobs_maker(req, chat)
        usage = {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + n, "completion_tokens": n}
        head = {"id": "cmpl-1", "object": "chat.completion" if chat else "text_completion", "created": 1,
                "model": SERVED}
        if not req.stream:
            choice = {"index": 0, "finish_reason": "length", "stop_reason": None,
                      "token_ids": ids if want else None}
            text = "".join(self._text(i) for i in ids)
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                choice["logprobs"] = lp(ids, 0)
                extra = {"prompt_token_ids": prompt if want else None}
            else:
                choice.update(text=text, logprobs=lp(ids, 0), prompt_token_ids=prompt if want else None)
                extra = {}
            return web.json_response({**head, "choices": [choice], "usage": usage, **extra})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        for k, i in enumerate(ids):
            last = k == n - 1
            c = {"index": 0, "finish_reason": "length" if last else None}
            if chat:
                c["delta"] = {"content": self._text(i)}
                c["logprobs"] = lp([i], 0)
            else:
                c.update(text=self._text(i), logprobs=lp([i], 3 * k))
            if last:
                c["stop_reason"] = None
            if want:
                c["token_ids"] = [i]
                if k == 0 and not chat:
                    c["prompt_token_ids"] = prompt
            await out.write(b"data: " + json.dumps({**head, "choices": [c]}).encode() + b"\n\n")
        opts = req.stream_options
        if opts is not None and opts.include_usage:
            await out.write(b"data: " + json.dumps({**head, "choices": [], "usage": usage}).encode() + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": SERVED, "object": "model",
                                                              "max_model_len": self.max_model_len}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app
