"""Token 1 handed to an early decode: the request's prompt grows by the prefill's token.

The proxy sends an early decode (``pd.proxy.early``) with ``kv_transfer_params.handoff`` when it
will offer the decode the prefill's token 1 (``pd.coordinator.first``). Once the token is known,
the decode's lookup appends it to the request's *prompt*, before vLLM counts what is left to
compute: from then on the request is the first-token path's decode half (prompt + token 1, the
prompt's KV loaded, ``kv_tokens`` the prompt's length), so its first step computes token 1's KV
and samples token 2, and the answer it streams starts at token 2.

What a request holds about its length, as read in vLLM 0.26's and 0.32's ``v1/request.py``,
``v1/core/sched/scheduler.py`` and ``v1/core/sched/utils.py`` (``check_stop``):
``prompt_token_ids`` (handed to the workers as ``NewRequestData.prompt_token_ids``),
``_all_token_ids`` (what ``num_tokens`` counts, viewed by ``all_token_ids``), ``num_prompt_tokens``,
``block_hashes`` (full blocks only: ``update_block_hashes`` adds the block token 1 may complete),
``max_tokens`` (``check_stop``: output tokens), and the sampling parameters' ``max_tokens`` and
``min_tokens`` (the workers' min-tokens logits processor and ``check_stop`` count output tokens).
Token 1 moves from output to prompt, so the output limits drop by one and the total stays.
The API server keeps its own copy of the request (the client's prompt): the text of token 2 is
decoded after the prompt without token 1, which the proxy allows only where that is the same
text (``pd.proxy.early.handoff_allowed``).
"""
from __future__ import annotations

import copy


def wants_handoff(request) -> bool:
    p = getattr(request, "kv_transfer_params", None)
    return isinstance(p, dict) and p.get("handoff") is True


def append_first_token(request, token: int) -> bool:
    """Make ``token`` the prompt's last token (vLLM's ``Request``, before it is scheduled); False,
    and the request left as it is, where token 1 is all it may give (``max_tokens`` 1: vLLM refuses
    a request for no token, and the proxy answers such a request from the prefill alone)."""
    if request.max_tokens <= 1:
        return False
    n = len(request.prompt_token_ids)
    request.prompt_token_ids = [*request.prompt_token_ids, token]
    request._all_token_ids.append(token)  # in place: ``all_token_ids`` is a view of this list
    request.num_prompt_tokens += 1
    request.max_tokens -= 1
    sp = copy.copy(request.sampling_params)  # its own: never shared with another request
    if sp.max_tokens is not None:
        sp.max_tokens -= 1
    if sp.min_tokens:
        sp.min_tokens -= 1
    request.sampling_params = sp
    if hasattr(request, "update_block_hashes"):
        request.update_block_hashes()
    # The transfer's KV covers the client's prompt, without token 1 (the first-token path's rule).
    request.kv_transfer_params = {**request.kv_transfer_params, "kv_tokens": n}
    return True
