"""A small Hugging Face Hub-compatible HTTP server for tests (standard library only, in memory).

It speaks the part of the Hub protocol that the real ``huggingface_hub`` client uses to create repos, upload folders
(regular files inline in the commit, large/binary files through the Git LFS batch API with ``basic`` transfers) and
download files (``resolve`` with ``X-Repo-Commit``/``ETag``/``X-Linked-*`` headers and ranges). No test can reach the
real Hub; this lets the library's push and load paths run end to end through the real client. Start it with
``HubServer().start()``, point ``HF_ENDPOINT`` at ``server.endpoint`` and set ``HF_HUB_DISABLE_XET=1`` before
``huggingface_hub`` is imported (an ``lfs`` upload mode otherwise switches the client to the Xet protocol).

Every request is recorded in ``server.requests`` as ``(method, path)`` (no headers: they carry the token), so tests can
check what a push sent, e.g. that a second push of an unchanged folder makes no commit and uploads no blob.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".wav", ".flac", ".png", ".npy", ".model")
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """What the preupload endpoint reports: sha256 of LFS content, git blob sha1 of regular files."""
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_sha1(self.content)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    commits: list[tuple[str, dict[str, StoredFile], str]] = field(default_factory=list)  # (sha, files, title)

    @property
    def head(self) -> tuple[str, dict[str, StoredFile]]:
        sha, files, _ = self.commits[-1]
        return sha, files


class HubServer:
    """An in-memory Hub on 127.0.0.1 (port 0: the OS picks a free one). ``token`` is required for writes."""

    def __init__(self, token: str = "hf_test_token_0123456789", user: str = "test-user"):
        self.token = token
        self.user = user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> HubServer:
        hub = self

        class Handler(_HubHandler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ---- state ------------------------------------------------------------------------------------------------
    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        """Path -> content of the head commit of a repo."""
        _, files = self.repos[(repo_type, repo_id)].head
        return {path: stored.content for path, stored in files.items()}

    def commit_count(self, repo_id: str, repo_type: str = "model") -> int:
        return len(self.repos[(repo_type, repo_id)].commits)

    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_type, repo_id, private)
        gitattributes = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
        initial = {".gitattributes": StoredFile(gitattributes.encode(), lfs=False)}
        repo.commits.append((self._commit_sha(repo_id, "", initial, "initial commit"), initial, "initial commit"))
        self.repos[(repo_type, repo_id)] = repo
        return repo

    @staticmethod
    def _commit_sha(repo_id: str, parent: str, files: dict[str, StoredFile], title: str) -> str:
        tree = sorted((path, stored.oid) for path, stored in files.items())
        return hashlib.sha1(json.dumps([repo_id, parent, title, tree]).encode()).hexdigest()


class _HubHandler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass  # the default logs every request to stderr

    # ---- plumbing ------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, code: str | None, message: str):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.server_hub.token}"

    def _dispatch(self):
        hub = self.server_hub
        url = urlsplit(self.path)
        path = unquote(url.path)
        with hub.lock:
            hub.requests.append((self.command, path))
        body = self._body() if self.command in ("POST", "PUT") else b""
        try:
            self._route(self.command, path, parse_qs(url.query), body)
        except Exception as error:  # a bug in the test server must show up as a clear 500, not a hang
            self._error(500, None, f"test hub server error: {type(error).__name__}: {error}")

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # ---- routes ------------------------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict, body: bytes):
        hub = self.server_hub
        type_prefix = r"(?P<type>models|datasets|spaces)"
        repo_re = r"(?P<repo>[^/]+/[^/]+)"
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))
        if method == "GET" and path in ("/api/whoami-v2", "/api/whoami"):
            if not self._authorized():
                return self._error(401, None, "Invalid credentials in Authorization header")
            return self._json(200, {"name": hub.user, "type": "user", "orgs": []})
        if match := re.fullmatch(rf"/api/{type_prefix}/{repo_re}/preupload/(?P<rev>[^/]+)", path):
            return self._preupload(match, json.loads(body))
        if match := re.fullmatch(rf"/api/{type_prefix}/{repo_re}/commit/(?P<rev>[^/]+)", path):
            return self._commit(match, body)
        if match := re.fullmatch(rf"/(?:(?P<type>datasets|spaces)/)?{repo_re}\.git/info/lfs/objects/batch", path):
            return self._lfs_batch(json.loads(body))
        if method == "PUT" and (match := re.fullmatch(r"/_lfs/(?P<oid>[0-9a-f]{64})", path)):
            return self._lfs_put(match["oid"], body)
        if match := re.fullmatch(rf"/api/{type_prefix}/{repo_re}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path):
            return self._tree(match, query)
        if match := re.fullmatch(rf"/api/{type_prefix}/{repo_re}(?:/revision/(?P<rev>[^/]+))?", path):
            return self._repo_info(match)
        if match := re.fullmatch(
            rf"/(?:(?P<type>datasets|spaces)/)?{repo_re}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path
        ):
            return self._resolve(match)
        return self._error(404, None, f"test hub server: no route for {method} {path}")

    def _repo(self, match) -> Repo | None:
        repo_type = (match["type"] or "models").rstrip("s")
        return self.server_hub.repos.get((repo_type, match["repo"]))

    def _revision(self, repo: Repo, revision: str | None):
        """(sha, files) of a revision: the branch ``main`` or a commit sha; None if unknown."""
        if revision in (None, "main"):
            return repo.head
        for sha, files, _ in repo.commits:
            if sha == revision:
                return sha, files
        return None

    def _create_repo(self, payload: dict):
        hub = self.server_hub
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or hub.user
        repo_id = f"{namespace}/{payload['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{hub.endpoint}/{prefix}{repo_id}"
        with hub.lock:
            if (repo_type, repo_id) in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            hub.create_repo(repo_type, repo_id, bool(payload.get("private")))
        return self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, payload: dict):
        content = payload.get("content", "")
        match = re.match(r"^---\n(.*?)\n---", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match[1]) if match else {}
        except yaml.YAMLError as error:
            return self._json(400, {"error": f"Invalid YAML in README.md metadata: {error}"})
        if metadata is not None and not isinstance(metadata, dict):
            return self._json(400, {"error": "README.md metadata must be a mapping"})
        return self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, match, payload: dict):
        repo = self._repo(match)
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found")
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        revision = self._revision(repo, match["rev"])
        existing = revision[1] if revision else {}
        answer = []
        for entry in payload["files"]:
            sample = base64.b64decode(entry["sample"])
            lfs = (entry["path"].endswith(LFS_SUFFIXES) or entry["size"] >= LFS_MIN_SIZE or b"\0" in sample) and entry[
                "size"
            ] > 0
            stored = existing.get(entry["path"])
            answer.append(
                {
                    "path": entry["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": stored.oid if stored is not None and stored.lfs == lfs else None,
                }
            )
        return self._json(200, {"files": answer, "commitOid": repo.head[0]})

    def _lfs_batch(self, payload: dict):
        hub = self.server_hub
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in hub.lfs_objects:  # already stored: no actions, the client skips the upload
                entry["actions"] = {"upload": {"href": f"{hub.endpoint}/_lfs/{obj['oid']}", "header": {}}}
            objects.append(entry)
        return self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, oid: str, body: bytes):
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, None, "LFS object does not match its oid")
        with self.server_hub.lock:
            self.server_hub.lfs_objects[oid] = body
        return self._send(200)

    def _commit(self, match, body: bytes):
        hub = self.server_hub
        repo = self._repo(match)
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found")
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        if match["rev"] != "main":
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {match['rev']}")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        with hub.lock:
            parent, files = repo.head
            files = dict(files)
            title = ""
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    title = value.get("summary", "")
                    if value.get("parentCommit") not in (None, parent):
                        return self._error(412, None, "A commit has happened since the parent commit")
                elif key == "file":
                    content = (
                        base64.b64decode(value["content"])
                        if value.get("encoding") == "base64"
                        else (value["content"].encode())
                    )
                    files[value["path"]] = StoredFile(content, lfs=False)
                elif key == "lfsFile":
                    if value["oid"] not in hub.lfs_objects:
                        return self._error(400, None, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = StoredFile(hub.lfs_objects[value["oid"]], lfs=True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {path: stored for path, stored in files.items() if not path.startswith(prefix)}
                else:
                    return self._error(400, None, f"unknown commit operation {key!r}")
            sha = hub._commit_sha(repo.repo_id, parent, files, title)
            repo.commits.append((sha, files, title))
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return self._json(
            200,
            {
                "commitUrl": f"{hub.endpoint}/{prefix}{repo.repo_id}/commit/{sha}",
                "commitOid": sha,
                "pullRequestUrl": None,
            },
        )

    def _repo_info(self, match):
        repo = self._repo(match)
        if repo is None or (repo.private and not self._authorized()):
            return self._error(401, "RepoNotFound", "Repository not found")
        revision = self._revision(repo, match["rev"])
        if revision is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {match['rev']}")
        sha, files = revision
        card_data = None
        if "README.md" in files:
            found = re.match(r"^---\n(.*?)\n---", files["README.md"].content.decode(), re.DOTALL)
            card_data = yaml.safe_load(found[1]) if found else None
        return self._json(
            200,
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": sha,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "tags": (card_data or {}).get("tags", []),
                "cardData": card_data,
                "siblings": [{"rfilename": path} for path in sorted(files)],
            },
        )

    def _tree(self, match, query: dict):
        repo = self._repo(match)
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found")
        revision = self._revision(repo, match["rev"])
        if revision is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {match['rev']}")
        _, files = revision
        sub = (match["sub"] or "").strip("/")
        prefix = f"{sub}/" if sub else ""
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for path, stored in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entry = {"type": "file", "oid": git_sha1(stored.content), "size": len(stored.content), "path": path}
            if stored.lfs:
                entry["lfs"] = {"oid": stored.oid, "size": len(stored.content), "pointerSize": 134}
            entries.append(entry)
        if sub and not entries and not folders:
            return self._error(404, "EntryNotFound", f"{sub} does not exist")
        entries += [{"type": "directory", "oid": git_sha1(f.encode()), "size": 0, "path": f} for f in sorted(folders)]
        return self._json(200, entries)

    def _resolve(self, match):
        repo = self._repo(match)
        if repo is None or (repo.private and not self._authorized()):
            return self._error(401, "RepoNotFound", "Repository not found")
        revision = self._revision(repo, match["rev"])
        if revision is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {match['rev']}")
        sha, files = revision
        stored = files.get(match["file"])
        if stored is None:
            return self._error(404, "EntryNotFound", f"{match['file']} does not exist on {match['rev']}")
        content = stored.content
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_sha1(content)}"', "Accept-Ranges": "bytes"}
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.oid}"', "X-Linked-Size": str(len(content))})
        status = 200
        if range_header := self.headers.get("Range"):
            first, _, last = range_header.removeprefix("bytes=").partition("-")
            size = len(content)
            if first:  # "bytes=a-b" or "bytes=a-"
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            else:  # "bytes=-n": the last n bytes
                start, end = max(0, size - int(last)), size - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            content = content[start : end + 1]
            status = 206
        return self._send(status, content, headers, content_type="application/octet-stream")
