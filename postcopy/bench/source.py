"""`python -m postcopy.bench.source`: the bench's migration source, `postcopy source` with one
more knob (``--prefill``: the fraction of guest RAM written before the guest starts). Prints
one JSON line with its URL when ready; the token comes from $POSTCOPY_TOKEN."""
from __future__ import annotations

import argparse
import json
import os

from postcopy.bench.common import TOKEN_ENV
from postcopy.source.run import serve


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m postcopy.bench.source")
    parser.add_argument("--mem", type=int, required=True, help="bytes")
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--prefill", type=float, default=0.0)
    args = parser.parse_args()
    serve(args.mem, args.vcpus, host="127.0.0.1", port=0, token=os.environ[TOKEN_ENV], seed=args.seed,
          warmup_s=0.0, prefill=args.prefill,
          on_ready=lambda url: print(json.dumps({"event": "ready", "url": url}), flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
