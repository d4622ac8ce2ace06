"""`python -m app serve` with another upstream transport, for measuring it without touching app/.

    python bench/gateway_serve.py --port 8000 --transport aiohttp

`--transport httpx` is exactly `python -m app serve`; `aiohttp` passes
`bench/passthrough.py:gateway_aiohttp_transport()` (httpx-aiohttp's AiohttpTransport with a
cookie-less session and the errors remapped) as `create_app(..., upstream_transport=...)`, the
same hook the demo uses. Settings come from the GATEWAY_* environment as usual.

`--what-if cache` is a measurement aid, not a proposal to ship as is: it monkeypatches two
in-process caches into the running gateway to size what removing the per-request database
sessions of a GET would gain (see RESULTS.md):
  * token authentication: `app.tokens.service.authenticate` answers from a 1-second cache keyed
    by the presented secret's HMAC (a revoked token would keep working for up to 1 s);
  * final predictions: `PredictionService.owned` answers a final prediction from a cache (a final
    prediction never changes in the ledger).
`--what-if cache-inline` also runs FastAPI's sync (`def`) dependencies inline instead of in
anyio's thread pool, which is what making `app/deps.py`'s `get_state` and `public_base`
`async def` would do. BENCH_GC_FREEZE=1 in the environment turns Python's cyclic GC off, to
measure what its pauses cost.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--transport", choices=("httpx", "aiohttp"), default="httpx")
    parser.add_argument("--what-if", choices=("none", "cache", "cache-inline"), default="none")
    args = parser.parse_args()
    if os.environ.get("BENCH_GC_FREEZE"):  # experiment: no cyclic GC pauses
        import gc

        gc.disable()
    if args.what_if in ("cache", "cache-inline"):
        install_caches()
    if args.what_if == "cache-inline":
        inline_sync_dependencies()
    if args.transport == "httpx":
        from app.cli import main as cli

        return cli(["serve", "--host", args.host, "--port", str(args.port)])
    import uvicorn
    from app.config import get_settings
    from app.db import migrate
    from app.main import create_app

    from passthrough import gateway_aiohttp_transport

    settings = get_settings()
    migrate(settings.database_url)
    app = create_app(settings, upstream_transport=gateway_aiohttp_transport())
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, proxy_headers=False,
                loop="uvloop", http="httptools")
    return 0


def inline_sync_dependencies() -> None:
    from typing import Any

    import fastapi.dependencies.utils as utils

    async def inline(func: Any, *args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    utils.run_in_threadpool = inline  # type: ignore[assignment]


def install_caches() -> None:
    import time
    from typing import Any

    from app.predictions.service import PredictionService
    from app.tokens import service as tokens

    authenticate = tokens.authenticate
    known: dict[str, tuple[float, Any]] = {}

    async def cached_authenticate(session: Any, raw_token: str, key: bytes) -> Any:
        digest = tokens.hash_token(raw_token, key)
        hit = known.get(digest)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        token = await authenticate(session, raw_token, key)
        known[digest] = (time.monotonic() + 1.0, token)
        return token

    tokens.authenticate = cached_authenticate  # type: ignore[assignment]

    owned = PredictionService.owned
    final: dict[tuple[str, str], Any] = {}

    async def cached_owned(self: Any, token: Any, prediction_id: str) -> Any:
        row = final.get((token.id, prediction_id))
        if row is not None:
            return row
        row = await owned(self, token, prediction_id)
        if row.is_terminal:
            final[token.id, prediction_id] = row
        return row

    PredictionService.owned = cached_owned  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
