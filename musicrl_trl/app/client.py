"""A small client of the app's JSON API that survives server restarts, and the server run as a subprocess: for
scripted raters, tests and the example.

Every call is retried on connection errors, timeouts and 502/503/504 until ``retry_deadline_s`` has passed, and the
retries are safe: ``GET /api/pair`` hands back the rater's open pair, ``POST /api/played`` may be repeated, and every
vote carries one ``Idempotency-Key`` that all its retries reuse, so a vote whose answer was lost is answered again
from the database instead of being stored twice. Standard library only (urllib).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ApiError", "RaterClient", "ServerProcess"]

RETRY_STATUSES = (502, 503, 504)


class ApiError(Exception):
    """The server answered with an error status (not retried): ``status``, ``code``, ``detail``."""

    def __init__(self, status: int, body: dict[str, Any]):
        super().__init__(f"{status} {body.get('error')}: {body.get('detail')}")
        self.status = status
        self.code = body.get("error")
        self.detail = body.get("detail")


@dataclass
class RaterClient:
    base_url: str
    token: str
    timeout_s: float = 10.0
    retry_deadline_s: float = 120.0
    retries: int = field(default=0, init=False)  # requests sent again after a failure
    replayed_votes: int = field(default=0, init=False)  # votes the server had already stored (answer was lost)

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        all_headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        deadline = time.monotonic() + self.retry_deadline_s
        delay = 0.05
        while True:
            request = urllib.request.Request(self.base_url + path, data=data, headers=all_headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = response.read()
                    kind = response.headers.get("Content-Type", "")
                    return json.loads(payload) if kind.startswith("application/json") else payload
            except urllib.error.HTTPError as error:
                if error.code not in RETRY_STATUSES:
                    try:
                        raise ApiError(error.code, json.loads(error.read() or b"{}")) from None
                    except json.JSONDecodeError:
                        raise ApiError(error.code, {"error": "http_error", "detail": error.reason}) from None
                failure: Exception = error
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                failure = error
            if time.monotonic() + delay > deadline:
                raise TimeoutError(f"{method} {path} kept failing for {self.retry_deadline_s} s: {failure}")
            self.retries += 1
            time.sleep(delay)
            delay = min(2 * delay, 1.0)

    def pair(self) -> dict[str, Any]:
        return self.request("GET", "/api/pair")

    def clip(self, url: str) -> bytes:
        return self.request("GET", url)

    def played(self, pair_id: str, side: str) -> dict[str, Any]:
        return self.request("POST", "/api/played", {"pair_id": pair_id, "side": side})

    def vote(self, pair_id: str, choice: str, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"pair_id": pair_id, "choice": choice}
        if reason is not None:
            body["reason"] = reason
        answer = self.request("POST", "/api/vote", body, {"Idempotency-Key": secrets.token_hex(16)})
        self.replayed_votes += bool(answer.get("replayed"))
        return answer

    def rate(self, pair_id: str, side: str, **scores: int) -> dict[str, Any]:
        body = {"pair_id": pair_id, "side": side, **scores}
        return self.request("POST", "/api/rate", body, {"Idempotency-Key": secrets.token_hex(16)})

    def listen_and_vote(self, choose, reason: str | None = None) -> dict[str, Any]:
        """Fetch a pair, fetch both clips, wait as long as the longer one plays, report both played, vote.

        ``choose(prompt, audio_a: bytes, audio_b: bytes) -> "a" | "b" | "tie"`` is the rater's taste.
        """
        pair = self.pair()
        audio = {side: self.clip(pair[side]["url"]) for side in ("a", "b")}
        time.sleep(max(pair["a"]["duration_s"], pair["b"]["duration_s"]))
        for side in ("a", "b"):
            self.played(pair["pair_id"], side)
        return {**self.vote(pair["pair_id"], choose(pair["prompt"], audio["a"], audio["b"]), reason), **pair}


class ServerProcess:
    """``musicrl-app serve`` in a subprocess (``python -m musicrl_trl.app``); :attr:`url` once it is ready.

    ``port=0`` lets the server pick a free port; restart on the same one with ``ServerProcess(..., port=old.port)``.
    ``kill()`` sends SIGKILL: no graceful shutdown, as in a crash.
    """

    def __init__(
        self,
        pool: str | os.PathLike,
        db: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int = 0,
        mode: str = "collect",
        env: dict[str, str] | None = None,
        timeout_s: float = 300.0,
    ):
        command = [sys.executable, "-m", "musicrl_trl.app", "serve", "--pool", os.fspath(pool), "--db", os.fspath(db)]
        command += ["--host", host, "--port", str(port), "--mode", mode]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
        )
        self.output: list[str] = []
        self.url: str | None = None
        self._pattern = re.compile(rf"http://{re.escape(host)}:\d+")
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(timeout_s) or self.url is None:
            self.kill()
            raise RuntimeError("the app server did not start:\n" + "".join(self.output[-40:]))
        self.port = int(self.url.rsplit(":", 1)[1])

    def _drain(self) -> None:
        for line in self.process.stdout:  # keep reading, so that the server never blocks on a full pipe
            self.output.append(line)
            match = self._pattern.search(line)
            if match and self.url is None:
                self.url = match.group(0)
                self._ready.set()
        self._ready.set()  # the process ended

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=60)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.kill()
