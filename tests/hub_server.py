"""A small, real, Hugging Face Hub-compatible HTTP server for tests (stdlib only).

It implements the subset of the Hub HTTP API that ``huggingface_hub`` (2.x) uses for:

- ``HfApi.create_repo`` / ``delete_repo``        POST /api/repos/create, DELETE /api/repos/delete
- ``HfApi.upload_folder`` / ``create_commit``     POST /api/validate-yaml, POST /api/{type}s/{id}/preupload/{rev},
                                                  POST /api/{type}s/{id}/commit/{rev} (NDJSON)
- ``hf_hub_download`` / ``snapshot_download``    HEAD+GET /{id}/resolve/{rev}/{path}, GET /api/{type}s/{id}/tree/{rev}
- ``model_info`` / ``repo_info`` / ``list_repo_files`` / ``list_repo_commits`` / ``list_repo_refs`` /
  ``get_paths_info`` / ``whoami``

Every file is answered with ``uploadMode: "regular"`` by the preupload endpoint, so the client never takes the
LFS or Xet upload paths (which would need an S3 / CAS backend): file contents arrive base64-encoded inside the commit.

Storage is content addressed, like git: file contents live once in ``<root>/objects`` keyed by their git blob sha1
(which is also the ``ETag`` / ``oid`` the real Hub reports for non-LFS files), every commit is an immutable JSON
snapshot of the whole tree keyed by its own sha1, and ``refs.json`` maps branch names (only ``main``) to commits.

Usage::

    with HubServer() as url:  # binds 127.0.0.1 on an ephemeral port
        ...  # run clients with HF_ENDPOINT=url (in a subprocess: huggingface_hub reads it at import time)

    python tests/hub_server.py --port 8123 --root /tmp/hub   # standalone; prints the base url once listening
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer", "DEFAULT_NAMESPACE", "client_env", "git_blob_sha1", "main"]

HOST = "127.0.0.1"
# Namespace used when a repo is created without one; the real Hub would use the token owner's name.
DEFAULT_NAMESPACE = "user"
DEFAULT_BRANCH = "main"

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Same spirit as the Hub's repo name rules; also what keeps repo ids from escaping the storage root.
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")

# The Hub seeds every new repo with a .gitattributes commit; clients (and snapshot listings) see it, so we do too.
_GITATTRIBUTES = "".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n"
    for ext in ("7z", "bin", "ckpt", "gz", "h5", "npy", "npz", "onnx", "pt", "pth", "safetensors", "tar", "zip")
)



def client_env(endpoint: str, hf_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a Hub client process talking to ``endpoint`` (huggingface_hub reads it at import): the
    outer HF_* dropped (a developer's HF_HUB_OFFLINE or token must not leak in), a dummy token, no telemetry, no
    proxy for the loopback address; ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_TOKEN="dummy-token", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    env.update(extra)
    return env


def git_blob_sha1(content: bytes) -> str:
    """Git blob id of ``content``: what the Hub uses as oid/ETag for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    # Hub timestamps are millisecond ISO-8601 in UTC; huggingface_hub's parse_datetime expects exactly that shape.
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _write_json(path: Path, data: Any) -> None:
    # Write-then-rename so a concurrent reader (or a crash) never sees a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True, indent=1))
    os.replace(tmp, path)


def _valid_file_path(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and "\\" not in path and "\0" not in path and all(p not in ("", ".", "..") for p in parts)


class _HttpError(Exception):
    """Raised inside handlers; turned into a Hub-style error response (X-Error-Code + JSON ``error``)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class _Store:
    """On-disk, content-addressed repo storage. One lock serialises all access: tests are small, bugs are not."""

    def __init__(self, root: Path, gitattributes: bool) -> None:
        self.root = root
        self.gitattributes = gitattributes
        self.lock = threading.RLock()
        (root / "objects").mkdir(parents=True, exist_ok=True)
        (root / "repos").mkdir(parents=True, exist_ok=True)

    # -- repos -------------------------------------------------------------------------------------------------
    def repo_dir(self, repo_type: str, repo_id: str) -> Path | None:
        parts = repo_id.split("/")
        if repo_type not in _URL_PREFIX or len(parts) != 2 or not all(_NAME_RE.match(p) for p in parts):
            return None
        if any(".." in p or "--" in p for p in parts):
            return None
        return self.root / "repos" / repo_type / parts[0] / parts[1]

    def exists(self, repo_type: str, repo_id: str) -> bool:
        d = self.repo_dir(repo_type, repo_id)
        return d is not None and (d / "refs.json").is_file()

    def create(self, repo_type: str, repo_id: str, private: bool) -> bool:
        d = self.repo_dir(repo_type, repo_id)
        if d is None:
            raise _HttpError(400, f"Invalid repo name: {repo_id!r}")
        with self.lock:
            if self.exists(repo_type, repo_id):
                return False
            _write_json(d / "meta.json", {"createdAt": _now(), "private": private})
            tree: dict[str, dict[str, Any]] = {}
            if self.gitattributes:
                content = _GITATTRIBUTES.encode()
                tree[".gitattributes"] = {"oid": self.put_blob(content), "size": len(content)}
            sha = self._write_commit(d, parent=None, tree=tree, title="initial commit", message="")
            _write_json(d / "refs.json", {DEFAULT_BRANCH: sha})
            return True

    def delete(self, repo_type: str, repo_id: str) -> bool:
        with self.lock:
            if not self.exists(repo_type, repo_id):
                return False
            d = self.repo_dir(repo_type, repo_id)
            assert d is not None
            shutil.rmtree(d)
            return True

    def meta(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        d = self.repo_dir(repo_type, repo_id)
        assert d is not None
        return json.loads((d / "meta.json").read_text())

    def refs(self, repo_type: str, repo_id: str) -> dict[str, str]:
        d = self.repo_dir(repo_type, repo_id)
        assert d is not None
        return json.loads((d / "refs.json").read_text())

    def resolve_revision(self, repo_type: str, repo_id: str, revision: str) -> str | None:
        """Branch name or full commit sha -> commit sha (None when unknown)."""
        with self.lock:
            refs = self.refs(repo_type, repo_id)
            if revision in refs:
                return refs[revision]
            d = self.repo_dir(repo_type, repo_id)
            assert d is not None
            if _SHA_RE.match(revision) and (d / "commits" / f"{revision}.json").is_file():
                return revision
            return None

    def get_commit(self, repo_type: str, repo_id: str, sha: str) -> dict[str, Any]:
        d = self.repo_dir(repo_type, repo_id)
        assert d is not None
        return json.loads((d / "commits" / f"{sha}.json").read_text())

    # -- blobs and commits ----------------------------------------------------------------------------------------
    def blob_path(self, oid: str) -> Path:
        return self.root / "objects" / oid[:2] / oid[2:]

    def put_blob(self, content: bytes) -> str:
        oid = git_blob_sha1(content)
        path = self.blob_path(oid)
        if not path.exists():  # content addressed: an existing blob is already the right bytes
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(content)
            os.replace(tmp, path)
        return oid

    def _write_commit(self, d: Path, parent: str | None, tree: dict[str, Any], title: str, message: str) -> str:
        record = {
            "parents": [parent] if parent else [],
            "tree": tree,
            "title": title,
            "message": message,
            "date": _now(),
            "authors": [{"user": DEFAULT_NAMESPACE}],
        }
        # The commit id hashes the full snapshot plus parent and timestamp, so every commit gets a fresh sha.
        sha = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
        _write_json(d / "commits" / f"{sha}.json", {"id": sha, **record})
        return sha

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        operations: list[tuple[str, dict[str, Any]]],
        title: str,
        message: str,
        parent_commit: str | None,
    ) -> str:
        with self.lock:
            refs = self.refs(repo_type, repo_id)
            if branch not in refs:
                raise _HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = refs[branch]
            if parent_commit and not head.startswith(parent_commit):
                raise _HttpError(412, f"A commit has happened since {parent_commit}. Please refresh and try again.")
            tree = dict(self.get_commit(repo_type, repo_id, head)["tree"])
            for key, value in operations:
                path = str(value.get("path", "")).strip("/") if key == "deletedFolder" else str(value.get("path", ""))
                if not _valid_file_path(path):
                    raise _HttpError(400, f"Invalid path in commit: {path!r}")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise _HttpError(400, f"Unsupported encoding for {path!r}: {value.get('encoding')!r}")
                    content = base64.b64decode(value.get("content", ""), validate=True)
                    tree[path] = {"oid": self.put_blob(content), "size": len(content)}
                elif key == "deletedFile":
                    if tree.pop(path, None) is None:
                        raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    doomed = [p for p in tree if p.startswith(path + "/")]
                    if not doomed:
                        raise _HttpError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del tree[p]
                elif key == "lfsFile":
                    # We only ever answer uploadMode "regular", so an LFS pointer means a client/server mismatch.
                    raise _HttpError(400, f"LFS files are not supported by this test server: {path!r}")
                else:
                    raise _HttpError(400, f"Unknown commit operation: {key!r}")
            d = self.repo_dir(repo_type, repo_id)
            assert d is not None
            sha = self._write_commit(d, parent=head, tree=tree, title=title, message=message)
            _write_json(d / "refs.json", {**refs, branch: sha})
            return sha


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, store: _Store) -> None:
        self.store = store
        self.request_log: list[tuple[str, str]] = []
        self.log_lock = threading.Lock()
        self.open_sockets: set[socket.socket] = set()
        super().__init__((HOST, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse-DNS lookup that can stall without network.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = HOST, self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.log_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.log_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def close_open_sockets(self) -> None:
        # Keep-alive connections would otherwise keep handler threads (and the port) busy after stop().
        with self.log_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return  # clients hanging up mid-request is normal, not worth a traceback
        traceback.print_exc(file=sys.stderr)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every response carries a Content-Length
    server_version = "hub-test-server/1.0"
    sys_version = ""
    timeout = 60  # idle keep-alive connections are dropped after this many seconds

    # -- plumbing -------------------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        # Silent by design: no access log (tests stay quiet, and nothing can leak an Authorization header).
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    @property
    def store(self) -> _Store:
        return self.server.store

    @property
    def base_url(self) -> str:
        # URLs we hand back (repo url, commit url) must match the address the client used.
        return f"http://{self.headers.get('Host') or f'{HOST}:{self.server.server_port}'}"

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except ValueError as e:
            raise _HttpError(400, f"Invalid JSON body: {e}") from e

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json; charset=utf-8",
        headers: dict[str, str] | None = None,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers=headers)

    def _send_error(self, err: _HttpError) -> None:
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        # huggingface_hub maps errors from these headers (HEAD responses have no body to read the JSON from).
        headers["X-Error-Message"] = err.message.encode("ascii", "replace").decode()
        self._send_json({"error": err.message}, status=err.status, headers=headers)

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        with self.server.log_lock:
            self.server.request_log.append((method, split.path))
        try:
            body = self._read_body()  # always drain the body so the keep-alive connection stays in sync
            segments = split.path.split("/")[1:]
            if segments and segments[-1] == "":
                segments.pop()
            # Split before unquoting: revisions like "refs%2Fpr%2F1" are one quoted segment.
            segs = [unquote(s) for s in segments]
            self._route(method, segs, parse_qs(split.query), body)
        except _HttpError as err:
            self._send_error(err)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # a server bug must show up in the test output, not as a client timeout
            traceback.print_exc(file=sys.stderr)
            try:
                self._send_error(_HttpError(500, f"Internal test-server error: {e!r}"))
            except OSError:
                self.close_connection = True

    # -- routing --------------------------------------------------------------------------------------------------
    def _route(self, method: str, segs: list[str], query: dict[str, list[str]], body: bytes) -> None:
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo(self._json_body(body))
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo(self._json_body(body))
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml(self._json_body(body))
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if len(rest) >= 3 and rest[0] in _REPO_TYPES:
                repo_type, repo_id, tail = _REPO_TYPES[rest[0]], f"{rest[1]}/{rest[2]}", rest[3:]
                return self._repo_api(method, repo_type, repo_id, tail, query, body)
        else:
            # /{ns}/{name}/resolve/{rev}/{path...} (models) or /{datasets|spaces}/{ns}/{name}/resolve/...
            offset = 1 if segs[:1] in (["datasets"], ["spaces"]) else 0
            if len(segs) >= offset + 5 and segs[offset + 2] == "resolve" and method in ("GET", "HEAD"):
                repo_type = _REPO_TYPES[segs[0]] if offset else "model"
                repo_id = f"{segs[offset]}/{segs[offset + 1]}"
                return self._resolve(repo_type, repo_id, segs[offset + 3], "/".join(segs[offset + 4 :]))
        raise _HttpError(404, "Not Found")

    def _repo_api(
        self, method: str, repo_type: str, repo_id: str, tail: list[str], query: dict[str, list[str]], body: bytes
    ) -> None:
        self._require_repo(repo_type, repo_id)
        if method == "GET" and not tail:
            return self._info(repo_type, repo_id, DEFAULT_BRANCH, query)
        if method == "GET" and len(tail) == 2 and tail[0] == "revision":
            return self._info(repo_type, repo_id, tail[1], query)
        if method == "GET" and len(tail) >= 2 and tail[0] == "tree":
            return self._tree(repo_type, repo_id, tail[1], "/".join(tail[2:]), query)
        if method == "GET" and len(tail) == 2 and tail[0] == "commits":
            return self._commits(repo_type, repo_id, tail[1])
        if method == "GET" and tail == ["refs"]:
            return self._refs(repo_type, repo_id)
        if method == "POST" and len(tail) == 2 and tail[0] == "preupload":
            return self._preupload(repo_type, repo_id, tail[1], self._json_body(body))
        if method == "POST" and len(tail) == 2 and tail[0] == "commit":
            return self._commit(repo_type, repo_id, tail[1], query, body)
        if method == "POST" and len(tail) == 2 and tail[0] == "paths-info":
            return self._paths_info(repo_type, repo_id, tail[1], body)
        raise _HttpError(404, "Not Found")

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _require_repo(self, repo_type: str, repo_id: str) -> None:
        if not self.store.exists(repo_type, repo_id):
            # Like the Hub: 401 for anonymous callers, 404 for authenticated ones; X-Error-Code is what
            # huggingface_hub uses to raise RepositoryNotFoundError in both cases.
            status = 404 if self.headers.get("Authorization") else 401
            raise _HttpError(status, "Repository not found", "RepoNotFound")

    def _require_revision(self, repo_type: str, repo_id: str, revision: str) -> str:
        sha = self.store.resolve_revision(repo_type, repo_id, revision)
        if sha is None:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.base_url}/{_URL_PREFIX[repo_type]}{repo_id}"

    def _repo_type_from_payload(self, payload: dict[str, Any]) -> str:
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HttpError(400, f"Unsupported repo type: {repo_type!r}")
        return repo_type

    @staticmethod
    def _flag(query: dict[str, list[str]], name: str) -> bool:
        return query.get(name, ["false"])[-1].lower() in ("1", "true", "yes")

    # -- endpoints --------------------------------------------------------------------------------------------------
    def _whoami(self) -> None:
        if not self.headers.get("Authorization"):
            raise _HttpError(401, "Invalid credentials in Authorization header")
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(DEFAULT_NAMESPACE.encode()).hexdigest()[:24],
                "name": DEFAULT_NAMESPACE,
                "fullname": "Test User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _create_repo(self, payload: dict[str, Any]) -> None:
        repo_type = self._repo_type_from_payload(payload)
        repo_id = f"{payload.get('organization') or DEFAULT_NAMESPACE}/{payload.get('name', '')}"
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        url = self._repo_url(repo_type, repo_id)
        if not self.store.create(repo_type, repo_id, private):
            # huggingface_hub swallows the 409 when exist_ok=True, then reads "url" from this very body.
            self._send_json({"error": f"You already created this {repo_type} repo", "url": url}, status=409)
            return
        self._send_json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _delete_repo(self, payload: dict[str, Any]) -> None:
        repo_type = self._repo_type_from_payload(payload)
        repo_id = f"{payload.get('organization') or DEFAULT_NAMESPACE}/{payload.get('name', '')}"
        if not self.store.delete(repo_type, repo_id):
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        self._send_json({})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        # No YAML parser in the stdlib: only catch an unterminated front-matter block, accept everything else.
        content = str(payload.get("content", ""))
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and not any(line.strip() == "---" for line in lines[1:]):
            self._send_json({"errors": [{"message": "Unterminated YAML front matter"}], "warnings": []}, status=400)
            return
        self._send_json({"errors": [], "warnings": []})

    def _info(self, repo_type: str, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        sha = self._require_revision(repo_type, repo_id, revision)
        commit = self.store.get_commit(repo_type, repo_id, sha)
        meta = self.store.meta(repo_type, repo_id)
        blobs = self._flag(query, "blobs")
        siblings = []
        for path, entry in sorted(commit["tree"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        self._send_json(info)

    def _entries(self, tree: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Tree-listing entries (files and the folders implied by their paths), keyed by path."""
        entries: dict[str, dict[str, Any]] = {}
        folders: dict[str, list[str]] = {}
        for path, entry in tree.items():
            entries[path] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
            parts = path.split("/")
            for i in range(1, len(parts)):
                folders.setdefault("/".join(parts[:i]), []).append(f"{path}:{entry['oid']}")
        for folder, content in folders.items():
            # Folders are not stored; a stable id derived from their content stands in for git's tree oid.
            oid = hashlib.sha1("\n".join(sorted(content)).encode()).hexdigest()
            entries[folder] = {"type": "directory", "oid": oid, "size": 0, "path": folder}
        return entries

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, query: dict[str, list[str]]) -> None:
        sha = self._require_revision(repo_type, repo_id, revision)
        entries = self._entries(self.store.get_commit(repo_type, repo_id, sha)["tree"])
        if path and entries.get(path, {}).get("type") != "directory":
            raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        prefix = f"{path}/" if path else ""
        recursive = self._flag(query, "recursive")
        listing = [
            entry
            for p, entry in sorted(entries.items())
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])
        ]
        self._send_json(listing)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        sha = self._require_revision(repo_type, repo_id, revision)
        entries = self._entries(self.store.get_commit(repo_type, repo_id, sha)["tree"])
        form = parse_qs(body.decode())
        self._send_json([entries[p] for p in form.get("paths", []) if p in entries])

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        sha: str | None = self._require_revision(repo_type, repo_id, revision)
        history = []
        while sha:
            commit = self.store.get_commit(repo_type, repo_id, sha)
            history.append({k: commit[k] for k in ("id", "title", "message", "date", "authors")})
            sha = commit["parents"][0] if commit["parents"] else None
        self._send_json(history)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
            for name, sha in sorted(self.store.refs(repo_type, repo_id).items())
        ]
        self._send_json({"branches": branches, "tags": [], "converts": [], "pullRequests": []})

    def _preupload(self, repo_type: str, repo_id: str, revision: str, payload: dict[str, Any]) -> None:
        sha = self._require_revision(repo_type, repo_id, revision)
        tree = self.store.get_commit(repo_type, repo_id, sha)["tree"]
        gitignore = payload.get("gitIgnore")
        if gitignore is None and ".gitignore" in tree:
            gitignore = self.store.blob_path(tree[".gitignore"]["oid"]).read_text(errors="replace")
        patterns = [
            line.strip() for line in (gitignore or "").splitlines() if line.strip() and not line.startswith("#")
        ]
        files = []
        for item in payload.get("files", []):
            path = str(item.get("path", ""))
            # "regular" for everything: contents then travel base64-encoded in the commit, never via LFS or Xet.
            answer: dict[str, Any] = {"path": path, "uploadMode": "regular", "shouldIgnore": _ignored(path, patterns)}
            if path in tree:
                # The git blob oid of the current version lets the client skip files that did not change.
                answer["oid"] = tree[path]["oid"]
            files.append(answer)
        self._send_json({"files": files, "commitOid": sha})

    def _commit(self, repo_type: str, repo_id: str, revision: str, query: dict[str, list[str]], body: bytes) -> None:
        if self._flag(query, "create_pr"):
            raise _HttpError(400, "Pull requests are not supported by this test server")
        header: dict[str, Any] | None = None
        operations: list[tuple[str, dict[str, Any]]] = []
        try:
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if item.get("key") == "header":
                    header = item.get("value") or {}
                else:
                    operations.append((str(item.get("key")), item.get("value") or {}))
        except (ValueError, AttributeError) as e:
            raise _HttpError(400, f"Invalid NDJSON commit payload: {e}") from e
        if header is None or not str(header.get("summary", "")).strip():
            raise _HttpError(400, "Commit payload needs a header line with a non-empty summary")
        if self.store.resolve_revision(repo_type, repo_id, revision) is None:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if _SHA_RE.match(revision) and revision not in self.store.refs(repo_type, repo_id):
            raise _HttpError(400, f"Cannot commit to a commit sha ({revision}); use a branch name")
        sha = self.store.commit(
            repo_type,
            repo_id,
            revision,
            operations,
            title=str(header["summary"]),
            message=str(header.get("description", "")),
            parent_commit=header.get("parentCommit"),
        )
        self._send_json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        self._require_repo(repo_type, repo_id)
        sha = self._require_revision(repo_type, repo_id, revision)
        entry = self.store.get_commit(repo_type, repo_id, sha)["tree"].get(path)
        if entry is None:
            # X-Repo-Commit on the 404 lets the client cache the file's absence (.no_exist/<sha>/<path>).
            raise _HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        data = self.store.blob_path(entry["oid"]).read_bytes()
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{entry["oid"]}"',  # git blob sha1, as the Hub reports for non-LFS files
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        status, body = 200, data
        match = _RANGE_RE.match(self.headers.get("Range", "").strip())
        if match and (match.group(1) or match.group(2)):
            # Resumed downloads send "Range: bytes=N-"; answer with a proper 206 (or 416 past the end).
            size = len(data)
            if match.group(1):
                start, end = int(match.group(1)), int(match.group(2) or size - 1)
            else:
                start, end = max(size - int(match.group(2)), 0), size - 1
            if start >= size or start > end:
                raise _HttpError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            end = min(end, size - 1)
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(status, body, content_type="application/octet-stream", headers=headers)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Tiny .gitignore subset (glob per line, trailing '/' for folders, no negation): enough for tests."""
    if path == ".gitignore":
        return False
    parts = path.split("/")
    for pattern in patterns:
        if pattern.startswith("!"):
            continue
        anchored = pattern.strip("/")
        if pattern.endswith("/"):
            if any(fnmatch.fnmatch(folder, anchored) for folder in parts[:-1]):
                return True
        elif "/" in anchored:
            if fnmatch.fnmatch(path, anchored):
                return True
        elif any(fnmatch.fnmatch(part, anchored) for part in parts):
            return True
    return False


class HubServer:
    """Hub-compatible test server on 127.0.0.1, served from a background thread.

    ``root`` is where repos are stored; by default a fresh temp directory that ``stop()`` deletes. Pass a path to
    keep the data (e.g. to restart a server on the same repos). ``gitattributes`` seeds new repos with a
    ``.gitattributes`` file, as the real Hub does.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, port: int = 0, *, gitattributes: bool = True):
        self._owns_root = root is None
        self._root = Path(tempfile.mkdtemp(prefix="hub-server-")) if root is None else Path(root)
        self._port = port
        self._gitattributes = gitattributes
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def root(self) -> Path:
        return self._root

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("HubServer is not running")
        return f"http://{HOST}:{self._server.server_port}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request received so far; no headers, so tokens are never recorded."""
        if self._server is None:
            return []
        with self._server.log_lock:
            return list(self._server.request_log)

    def start(self) -> str:
        """Bind 127.0.0.1 (port 0 = ephemeral), serve in a daemon thread, return the base url."""
        if self._server is not None:
            return self.url
        self._server = _Server(self._port, _Store(self._root, self._gitattributes))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving, drop open connections, and delete the root if it was a temp dir we created."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.close_open_sockets()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._owns_root:
            shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _exit_on_signal(signum: int, frame: Any) -> NoReturn:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    """Standalone mode: serve ``--root`` on 127.0.0.1:``--port`` until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description="Hugging Face Hub-compatible test server (binds 127.0.0.1 only).")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one (default)")
    parser.add_argument("--root", help="storage directory (kept); default: a temp dir deleted on exit")
    parser.add_argument("--no-gitattributes", action="store_true", help="do not seed new repos with .gitattributes")
    args = parser.parse_args(argv)
    server = HubServer(args.root, args.port, gitattributes=not args.no_gitattributes)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        # The one stdout line: callers (e.g. with --port 0) read it to learn the url and that we are listening.
        print(server.start(), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
