"""The lab page: static files served by the Bento itself at ``/ui`` (same process and port).

Plain HTML, CSS and JavaScript in ``ui/``: no build step, nothing fetched from a CDN, so it works
offline. The files are open (no token: they hold no data); every API call the page makes carries the
bearer token the user types in, kept in the browser session only.
"""

from __future__ import annotations

from pathlib import Path

UI_DIR = Path(__file__).resolve().parent / "ui"
UI_PATH = "/ui"


def page_app():
    """A Starlette app serving ``ui/`` (``index.html`` at its root)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    return Starlette(routes=[Mount("/", app=StaticFiles(directory=UI_DIR, html=True))])
