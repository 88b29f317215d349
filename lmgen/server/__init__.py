"""`lmgen serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine."""

from __future__ import annotations

import signal
import sys
import threading

from ..core import CHUNK
from ..engine import Engine
from ..lm import LM
from .app import create_app
from .gate import allowed_hosts as hosts_for

__all__ = ["create_app", "serve"]


def serve(lm: LM, *, host: str = "127.0.0.1", port: int = 8000, max_concurrent: int = 8, max_waiting: int = 64,
          max_model_len: int | None = None, api_key: str | None = None, max_n: int = 8,
          max_body: int = 1 << 20, log_level: str = "info", allowed_hosts: list[str] | None = None,
          prefill_chunk: int | None = None, prefix_caching: bool = True) -> None:
    """Serve `lm` until SIGINT/SIGTERM; running streams then end with an error chunk instead of hanging.

    On a loopback bind only Host headers naming the loopback (and `allowed_hosts`) are answered.
    """
    import uvicorn

    # The engine runs in this thread, which loaded the model (see Engine.run); HTTP in another.
    engine = Engine(lm, max_concurrent=max_concurrent, max_waiting=max_waiting, max_model_len=max_model_len,
                    chunk=prefill_chunk or CHUNK, prefix_caching=prefix_caching, own_thread=False)
    app = create_app(engine, api_key=api_key, max_n=max_n, max_body=max_body,
                     allowed_hosts=hosts_for(host, allowed_hosts))
    state = app.state.lmgen

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # uvicorn waits for open responses before shutting down: end the streams first.
            super().handle_exit(sig, frame)
            state.begin_shutdown()

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = Server(config)
    sys.stderr.write(f"lmgen: serving {state.model_id} at http://{host}:{port}/v1 "
                     f"({max_concurrent} slots, max length {engine.max_model_len}, weights: {lm.weights}; "
                     f"constraints: {lm.constraints.describe()})\n")

    def http() -> None:
        try:
            server.run()
        finally:
            state.begin_shutdown()  # the server is done (or never started): so is the engine

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    thread = threading.Thread(target=http, name="lmgen-http")
    thread.start()
    engine.run()
    thread.join()
    if not server.started:
        raise SystemExit(1)
