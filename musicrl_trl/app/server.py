"""The listening app's web server: a JSON API and the Gradio UI in one FastAPI app.

API (token as ``Authorization: Bearer TOKEN``; 401 without a valid one; errors are ``{"error", "detail"}``):

=========================  ==========================================================================================
``GET /api/pair``          ``{"pair_id", "prompt", "mode", "a": {"clip_id", "url", "duration_s"}, "b": {...}}``; A/B
                           order random; the rater's open pair again if they have one; 404 ``no_pairs_left``.
``GET /api/clip/{id}``     the clip's audio, from the pool only (the ``url`` of ``/api/pair`` carries a signature, so
                           an ``<audio>`` element can fetch it without the header).
``POST /api/played``       ``{"pair_id", "side": "a"|"b"}``: that clip was played to the end.
``POST /api/vote``         ``{"pair_id", "choice": "a"|"b"|"tie", "reason"?}`` -> 200; 409 when a clip was not played
                           to the end or the pair already has the rater's vote; ``Idempotency-Key`` header for retries.
``POST /api/rate``         evaluation mode: ``{"pair_id", "side", "text_adherence", "acoustic_quality",
                           "overall_appeal"}`` (1-5 each) for one clip.
``GET /api/me``            the rater's name, role, vote count and the server's mode.
``GET /api/export``        admins only (403 otherwise): the votes as a ``datasets`` folder in a ``.tar.gz``; 409
                           ``no_votes`` while no vote on the pool's clips is stored.
=========================  ==========================================================================================

Malformed requests (bad JSON, unknown fields, wrong types, bad ids) are 400. The UI lives at ``/ui/``.
"""

from __future__ import annotations

import os
import shutil
import socket
import tarfile
import tempfile
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .pool import CLIP_ID, Pool, load_pool
from .store import IDEMPOTENCY_KEY, MODES, AppError, Rater, Store

__all__ = ["create_app", "serve", "pair_json"]

MEDIA_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}
PAIR_ID = r"^[0-9a-f]{24}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PlayedBody(_Body):
    pair_id: str = Field(pattern=PAIR_ID)
    side: Literal["a", "b"]


class VoteBody(_Body):
    pair_id: str = Field(pattern=PAIR_ID)
    choice: Literal["a", "b", "tie"]
    reason: str | None = Field(default=None, max_length=2000)


class RateBody(_Body):
    pair_id: str = Field(pattern=PAIR_ID)
    side: Literal["a", "b"]
    text_adherence: int = Field(ge=1, le=5)
    acoustic_quality: int = Field(ge=1, le=5)
    overall_appeal: int = Field(ge=1, le=5)


class JsonBodies:
    """Reads API request bodies sent without a JSON content type (``curl -d``, ``requests.post(data=...)``) as JSON;
    FastAPI would otherwise not parse them and answer 400 to a well-formed request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/api/"):
            kind = next((value for name, value in scope["headers"] if name == b"content-type"), b"")
            if kind.split(b";")[0].strip().lower() in (b"", b"text/plain", b"application/x-www-form-urlencoded"):
                headers = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def pair_json(store: Store, rater: Rater, pool: Pool, assignment: dict[str, Any]) -> dict[str, Any]:
    """What ``GET /api/pair`` answers (and what the UI renders)."""

    def side(clip_id: str) -> dict[str, Any]:
        signature = store.clip_signature(rater.id, clip_id)
        return {
            "clip_id": clip_id,
            "url": f"/api/clip/{clip_id}?rater={rater.id}&sig={signature}",
            "duration_s": round(pool.clips[clip_id].duration_s, 3),
        }

    return {
        "pair_id": assignment["pair_id"],
        "prompt": assignment["prompt"],
        "mode": assignment["mode"],
        "a": side(assignment["clip_a"]),
        "b": side(assignment["clip_b"]),
    }


def _idempotency_key(value: str | None) -> str | None:
    if value is not None and not IDEMPOTENCY_KEY.match(value):
        raise AppError(400, "bad_idempotency_key", "Idempotency-Key must be 1-128 characters of [A-Za-z0-9_.:-].")
    return value


def current_rater(request: Request, authorization: Annotated[str | None, Header()] = None) -> Rater:
    """The rater whose token is in ``Authorization: Bearer TOKEN``; 401 otherwise."""
    scheme, _, token = (authorization or "").partition(" ")
    found = request.app.state.store.authenticate(token.strip()) if scheme.lower() == "bearer" else None
    if found is None:
        raise AppError(401, "unauthorized", "send a valid rater token as `Authorization: Bearer TOKEN`.")
    return found


Authenticated = Annotated[Rater, Depends(current_rater)]


def create_app(
    pool_dir: str | os.PathLike,
    db_path: str | os.PathLike,
    mode: str = "collect",
    ui: bool = True,
    min_listen_fraction: float = 0.0,
):
    """The FastAPI app serving ``pool_dir`` and storing into ``db_path``; ``ui=False`` leaves Gradio out.

    ``min_listen_fraction``: refuse ``POST /api/played`` until the pair was given out at least this fraction of the
    clip's duration ago (0: trust the page's ``ended`` event; 0.9 makes scripted shortcuts wait like listeners).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if not 0.0 <= min_listen_fraction <= 1.0:
        raise ValueError(f"min_listen_fraction must lie in [0, 1], got {min_listen_fraction}.")
    pool = load_pool(pool_dir)
    if not pool.pairs(mode):
        need = (
            "clips from two systems for one prompt (make-pool --policy_b)"
            if mode == "evaluate"
            else ("at least two clips per prompt (make-pool --clips_per_prompt 2)")
        )
        raise ValueError(f"the pool in {pool_dir} has no pair to compare in {mode} mode: it needs {need}.")
    store = Store(db_path)

    app = FastAPI(title="musicrl-app", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.pool, app.state.mode = store, pool, mode
    app.add_middleware(JsonBodies)

    @app.exception_handler(AppError)
    async def app_error(request: Request, error: AppError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.to_json(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}" for problem in error.errors()
        )
        return JSONResponse({"error": "malformed", "detail": problems}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        # FastAPI answers JSON bodies it cannot parse with 400 "There was an error parsing the body"; keep one shape.
        code = "malformed" if error.status_code == 400 else "not_found" if error.status_code == 404 else "http_error"
        return JSONResponse({"error": code, "detail": str(error.detail)}, status_code=error.status_code)

    @app.get("/api/me")
    def me(who: Authenticated):
        return {"name": who.name, "admin": who.is_admin, "votes": store.vote_count(who), "mode": mode}

    @app.get("/api/pair")
    def get_pair(who: Authenticated):
        return pair_json(store, who, pool, store.next_pair(who, pool, mode))

    @app.get("/api/clip/{clip_id}")
    def get_clip(
        request: Request,
        clip_id: str,
        authorization: Annotated[str | None, Header()] = None,
        rater_id: Annotated[int | None, Query(alias="rater")] = None,
        sig: Annotated[str | None, Query(max_length=64)] = None,
    ):
        if not CLIP_ID.match(clip_id):
            raise AppError(400, "bad_clip_id", "clip ids hold only letters, digits and '_.-'.")
        signed = (
            rater_id is not None
            and sig is not None
            and store.check_clip_signature(rater_id, clip_id, sig)
            and store.rater_exists(rater_id)
        )
        if not signed:
            current_rater(request, authorization)
        if clip_id not in pool.clips:
            raise AppError(404, "unknown_clip", f"no clip {clip_id!r} in this pool.")
        # load_pool already refused files outside the pool; check again in case the folder changed since.
        path = pool.path_of(clip_id).resolve()
        if not path.is_relative_to(pool.root) or not path.is_file():
            raise AppError(404, "unknown_clip", f"clip {clip_id!r} is no longer in the pool folder.")
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"))

    @app.post("/api/played")
    def played(body: PlayedBody, who: Authenticated):
        return store.mark_played(who, body.pair_id, body.side, pool, min_listen_fraction)

    @app.post("/api/vote")
    def vote(body: VoteBody, who: Authenticated, idempotency_key: Annotated[str | None, Header()] = None):
        return store.vote(who, body.pair_id, body.choice, body.reason, _idempotency_key(idempotency_key))

    @app.post("/api/rate")
    def rate(body: RateBody, who: Authenticated, idempotency_key: Annotated[str | None, Header()] = None):
        if mode != "evaluate":
            raise AppError(400, "wrong_mode", "ratings are collected only when the server runs with --mode evaluate.")
        scores = body.model_dump(exclude={"pair_id", "side"})
        return store.rate(who, body.pair_id, body.side, scores, _idempotency_key(idempotency_key))

    @app.get("/api/export")
    def export(who: Authenticated):
        if not who.is_admin:
            raise AppError(403, "forbidden", "only an admin token may export (musicrl-app add-rater --admin).")
        from .export import export_dataset

        workdir = tempfile.mkdtemp(prefix="musicrl-export-")
        # The folder is removed after the response is sent (background task) or here, on any failure before that.
        try:
            dataset_dir = os.path.join(workdir, "preferences")
            try:
                export_dataset(store, pool, dataset_dir)
            except ValueError:  # export_dataset's only refusal: no vote on this pool's clips yet
                raise AppError(
                    409,
                    "no_votes",
                    "nothing to export yet: no vote on this pool's clips is stored. Collect votes first (raters vote "
                    "in the UI at /ui/ or through POST /api/vote), then export again.",
                ) from None
            archive = os.path.join(workdir, "preferences.tar.gz")
            with tarfile.open(archive, "w:gz") as tar:
                tar.add(dataset_dir, arcname="preferences")
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return FileResponse(
            archive,
            media_type="application/gzip",
            filename="preferences.tar.gz",
            background=BackgroundTask(shutil.rmtree, workdir, ignore_errors=True),
        )

    @app.get("/")
    def root():
        return RedirectResponse("/ui/" if ui else "/api/me")

    if ui:
        import gradio as gr

        from .ui import CSS, build_ui

        app = gr.mount_gradio_app(app, build_ui(store, pool, mode), path="/ui", css=CSS, footer_links=[])
    return app


def serve(
    pool_dir: str | os.PathLike,
    db_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 7860,
    mode: str = "collect",
    min_listen_fraction: float = 0.0,
) -> None:
    """Run the app until interrupted; print ``Serving on http://HOST:PORT`` once it accepts connections.

    ``port=0`` binds a free port (the printed line says which).
    """
    import uvicorn

    app = create_app(pool_dir, db_path, mode, min_listen_fraction=min_listen_fraction)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # A server restarted right after being killed must get its port back while old connections sit in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ValueError(
            f"cannot listen on {host}:{port} ({error.strerror}): pick another --port, or 0 for any."
        ) from None
    sock.listen(2048)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if family == socket.AF_INET6 else host

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                print(f"Serving on http://{shown_host}:{bound_port} (mode {mode}, UI at /ui/)", flush=True)

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    Server(config).run(sockets=[sock])
