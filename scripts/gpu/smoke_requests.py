"""Send a few prompts (short text, ~2k random tokens) to running deployments and compare them.

    python3 scripts/gpu/smoke_requests.py --pd URL --colocated URL [--nixl PREFILL_URL,DECODE_URL] --model NAME

Prints one row per prompt: TTFT per mode, whether the answers equal pd's, and pdkv's transfer
record (tokens, MB, load ms, waited-for-READY ms); then whether different prompts gave different
answers (with dummy weights they might not). Writes --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import random

from launch.bench.gpu import nixl_send, transfers
from launch.bench.serve_load import Request, Result, send_one

TEXT = ["def main(args):", "The quick brown fox jumps over", "import os\nimport sys\n\nclass Foo(object):"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--pd", required=True)
    p.add_argument("--colocated", required=True)
    p.add_argument("--nixl", default="")
    p.add_argument("--model", required=True)
    p.add_argument("--long-tokens", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--out", default="smoke.json")
    a = p.parse_args()
    prompts: list = list(TEXT) + [[random.Random(s).randrange(16, 4000) for _ in range(a.long_tokens)] for s in (1, 2)]
    sends = {"pd": (a.pd, send_one), "colocated": (a.colocated, send_one)}
    if a.nixl:
        pre, dec = a.nixl.split(",")
        sends["nixl"] = (pre, nixl_send([pre], [dec]))
    rows, out = [], {"modes": list(sends), "prompts": []}
    for i, prompt in enumerate(prompts):
        req = Request(0.0, prompt, a.max_tokens, isinstance(prompt, list))
        res = {}
        for mode, (url, send) in sends.items():
            r = Result(False, req.long, 0.0)
            send(url, a.model, req, r)
            res[mode] = r
        rec = (transfers(a.pd, [res["pd"]]) or [{}])[0]
        row = {"prompt": i, "tokens": rec.get("n_tokens"), "long": req.long,
               **{f"ttft_ms_{m}": round(r.ttft * 1e3, 1) if r.ttft else None for m, r in res.items()},
               **{f"same_{m}": res[m].ok and res[m].text == res["pd"].text for m in res if m != "pd"},
               "errors": {m: r.error for m, r in res.items() if r.error},
               "texts": {m: r.text for m, r in res.items()}, "transfer": rec}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "texts"}), flush=True)
    out["prompts"] = rows
    for mode in sends:
        texts = [r["texts"][mode] for r in rows]
        out[f"distinct_answers_{mode}"] = len(set(texts))
        print(f"{mode}: {len(set(texts))} distinct answers for {len(texts)} prompts; first: {texts[0]!r}; "
              f"long: {texts[-1]!r}", flush=True)
    for mode in list(sends)[1:]:
        print(f"{mode}: same answer as pd for {sum(r[f'same_{mode}'] for r in rows)} of {len(rows)} prompts")
    json.dump(out, open(a.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
