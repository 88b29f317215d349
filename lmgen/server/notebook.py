"""lm.explore(): the token explorer served from a background thread, for a notebook to show in a frame.

The page is the one `lmgen serve` serves, from the same app, on its own engine (one thread of its own) over the LM's
model. It is framed by the notebook's page, so its Content-Security-Policy names the origins a local notebook has as
frame ancestors (`lmgen serve` names none), and the Host check answers the loopback names the frame asks by.
"""

from __future__ import annotations

import atexit
import html
import socket
import threading
import time

from ..engine import Engine
from ..lm import LM
from .app import create_app
from .gate import allowed_hosts as hosts_for

# A local notebook's page: Jupyter (Lab, Notebook, Voila) on the loopback at any port, or VS Code, which renders a
# notebook's outputs in webviews inside its vscode-file: workbench (every ancestor must match, not only the parent).
NOTEBOOK_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*", "https://localhost:*", "https://127.0.0.1:*",
                    "vscode-webview:", "vscode-file:")
START_TIMEOUT = 60.0  # seconds for uvicorn to start answering
STOP_TIMEOUT = 30.0  # seconds for the server's thread and the engine to end
HEIGHT = 900  # pixels: the explorer page at a notebook's width, down to its first bars
_CSP_BREAKERS = set(" \t\r\n;,'\"")  # characters that would end a CSP source or directive: never in an origin


class Explorer:
    """A running token explorer: its `url`, a frame of it for a notebook (`_repr_html_`), and `stop()`; a context
    manager that stops it at the end of the block."""

    def __init__(self, server, thread: threading.Thread, state, listener: socket.socket, url: str, height: int):
        self.url, self.height = url, height
        self._server, self._thread, self._state, self._listener = server, thread, state, listener
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        """Whether the server's thread is still serving."""
        return not self._stopped and self._thread.is_alive()

    def stop(self) -> None:
        """End running streams, stop uvicorn and the engine, and join the server's thread; a second call does
        nothing."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        atexit.unregister(self.stop)
        self._state.begin_shutdown()  # streams end with an error event, so uvicorn has no response to wait for
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT)
        self._state.wait_stopped(STOP_TIMEOUT)
        self._listener.close()

    def __enter__(self) -> Explorer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Explorer({self.url!r}, {'running' if self.running else 'stopped'})"

    def _repr_html_(self) -> str:
        """The page in a frame (a notebook shows this), or a line saying it has stopped."""
        url = html.escape(self.url, quote=True)
        if not self.running:
            return f'<p class="lmgen-explorer">lmgen token explorer at <code>{url}</code>: stopped</p>'
        return (f'<iframe class="lmgen-explorer" src="{url}" title="lmgen token explorer" width="100%" '
                f'height="{int(self.height)}" style="border: 1px solid #d0d7de; border-radius: 6px"></iframe>')


def explore(lm: LM, *, host: str = "127.0.0.1", port: int = 0, frame_ancestors: list[str] | tuple = (),
            allowed_hosts: list[str] | None = None, height: int = HEIGHT, max_concurrent: int = 4) -> Explorer:
    """Serve the token explorer on `lm` from a background thread and return the running Explorer.

    port 0 takes a free one. frame_ancestors adds origins (CSP sources, e.g. "https://hub.example.org") whose pages may
    frame it, beyond a local notebook's (NOTEBOOK_ORIGINS); allowed_hosts adds Host names it answers, as
    `lmgen serve --allowed-hosts` does.
    """
    import uvicorn

    origins = list(NOTEBOOK_ORIGINS) + checked_origins(frame_ancestors)
    engine = Engine(lm, max_concurrent=max_concurrent, own_thread=True)
    app = create_app(engine, allowed_hosts=hosts_for(host, allowed_hosts), frame_ancestors=origins)
    listener = _listen(host, port)
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    failure: list[BaseException] = []
    state = app.state.lmgen
    thread = threading.Thread(target=_serve, args=(server, listener, state, failure), name="lmgen-explorer",
                              daemon=True)
    thread.start()
    explorer = Explorer(server, thread, state, listener, _url(host, listener.getsockname()[1]), height)
    try:
        _wait_started(server, thread, failure)
    except BaseException:
        explorer.stop()
        raise
    atexit.register(explorer.stop)  # a kernel that exits first still ends the engine cleanly
    return explorer


def checked_origins(origins) -> list[str]:
    """The extra frame ancestors, each a single CSP source; ValueError for one that is not."""
    if isinstance(origins, str):
        origins = [origins]
    out = []
    for origin in origins:
        if not isinstance(origin, str) or not origin or set(origin) & _CSP_BREAKERS:
            raise ValueError("frame_ancestors must be CSP sources such as 'https://example.org' or "
                             f"'https://*.example.org:*', without spaces, quotes, ';' or ',': got {origin!r}")
        out.append(origin)
    return out


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts, so its port is known and no one else can take it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host.strip("[]"), port), family=family)


def _url(host: str, port: int) -> str:
    """The page's URL: a wildcard bind is reached on the loopback."""
    if host in ("0.0.0.0", "", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def _serve(server, listener: socket.socket, state, failure: list[BaseException]) -> None:
    try:
        server.run(sockets=[listener])
    except BaseException as e:  # handed to explore(), which raises it in the caller's thread
        failure.append(e)
    finally:
        state.begin_shutdown()  # the server is done (or never started): so is the engine


def _wait_started(server, thread: threading.Thread, failure: list[BaseException]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        if failure:
            raise RuntimeError(f"the token explorer's server failed to start: {failure[0]!r}") from failure[0]
        if not thread.is_alive():
            raise RuntimeError("the token explorer's server stopped while starting (see its log above)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the token explorer's server did not start within {START_TIMEOUT:g} s")
        time.sleep(0.02)
