"""A TEST DOUBLE of ``kubectl``: the two calls ``create-secrets.sh`` (``pd launch --emit k8s``)
makes, offline, so a test can run the script and check the Secrets it would create.

``kubectl [-n NS] create secret generic NAME --from-file=KEY=PATH ... --dry-run=client -o yaml``
prints the Secret (data base64, as kubectl does); ``kubectl [-n NS] apply -f -`` appends the
objects read from stdin, one JSON line each, to the file ``$KUBECTL_DOUBLE_STORE``. Anything
else exits 2 with a message: the double does only what the script needs.
"""
from __future__ import annotations

import base64
import json
import os
import re
import sys

import yaml

_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def _strip_namespace(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("-n", "--namespace"):
            skip = True
        elif not a.startswith("--namespace="):
            out.append(a)
    return out


def _create_secret(args: list[str]) -> int:
    name, rest = args[0], args[1:]
    if {"--dry-run=client", "-o", "yaml"} - set(rest):
        print("kubectl double: only `create secret generic ... --dry-run=client -o yaml` is known", file=sys.stderr)
        return 2
    data = {}
    for a in rest:
        if a.startswith("--from-file="):
            key, sep, path = a[len("--from-file="):].partition("=")
            if not sep or not _KEY.fullmatch(key):
                print(f"kubectl double: bad --from-file {a!r}", file=sys.stderr)
                return 2
            with open(path, "rb") as f:  # kubectl fails the same way on a missing file
                data[key] = base64.b64encode(f.read()).decode()
    print(yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data}))
    return 0


def main(argv: list[str]) -> int:
    args = _strip_namespace(argv)
    if args[:3] == ["create", "secret", "generic"] and len(args) > 3:
        return _create_secret(args[3:])
    if args == ["apply", "-f", "-"]:
        with open(os.environ["KUBECTL_DOUBLE_STORE"], "a") as out:
            for obj in yaml.safe_load_all(sys.stdin):
                if obj:
                    out.write(json.dumps(obj) + "\n")
        return 0
    print(f"kubectl double: {' '.join(argv)!r} is not a call it knows", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
