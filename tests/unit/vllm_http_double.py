"""A test double of a vLLM OpenAI server's request handling, for fuzzing the proxy in front of it.

Requests are validated by vLLM's own request models (``CompletionRequest``,
``ChatCompletionRequest``), so a body vLLM would refuse is refused here with vLLM's status and
error shape (400 ``BadRequestError``; 404 ``NotFoundError`` for a model it does not serve);
only the engine is missing: a valid request gets a short canned answer (streamed as SSE when
asked). It records every body it accepted or refused, for checks on what the proxy sent on.
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


class VllmHttpDouble:
    def __init__(self, name: str):
        self.name = name
        self.url = ""
        self.bodies: list[dict] = []
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
        text = {"index": 0, "text": f"from {self.name}", "finish_reason": "length"}
        if not req.stream:
            return web.json_response({"id": "cmpl-1", "object": "text_completion", "model": SERVED,
                                      "choices": [text]})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b"data: " + json.dumps({"id": "cmpl-1", "choices": [text]}).encode() + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": SERVED, "object": "model"}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app
