#!/usr/bin/env bash
# Build the libibverbs TEST DOUBLE (libibverbs_double.c, see its header): OUT_DIR/libibverbs.so.1.
# Usage: build.sh [OUT_DIR] (default: build/verbs-double). Does nothing when it is newer than its
# sources. Needs gcc and rdma-core's <infiniband/verbs.h> (Debian/Ubuntu: libibverbs-dev).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../../build/verbs-double}
so="$out/libibverbs.so.1"
if [ -f "$so" ] && [ "$so" -nt "$here/libibverbs_double.c" ] && [ "$so" -nt "$here/libibverbs_double.map" ]; then
    exit 0
fi
mkdir -p "$out"
gcc -O2 -Wall -Wextra -Werror -shared -fPIC -Wl,--version-script="$here/libibverbs_double.map" \
    -Wl,-soname,libibverbs.so.1 -o "$so.tmp" "$here/libibverbs_double.c"
mv "$so.tmp" "$so"
