"""Tests for tests/hub_server.py: the real huggingface_hub client against it, plus its raw HTTP contract.

huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_DISABLE_XET once, at import time, so every client run
happens in a fresh subprocess with its own environment (and a timeout, so a protocol bug fails instead of hanging).
"""

from __future__ import annotations

import base64
import hashlib
import json
import select
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

try:
    from hub_server import HubServer, client_env, git_blob_sha1
except ImportError:  # tests/ turned into a package
    from tests.hub_server import HubServer, client_env, git_blob_sha1

HUB_SERVER_SCRIPT = Path(__file__).with_name("hub_server.py")
SUBPROCESS_TIMEOUT = 60
REPO_ID = "popup-tests/tiny-masks"

# Phase 1: the full online round trip with the public client API.
ONLINE_CLIENT = r"""
import json
import sys
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

endpoint, repo_id, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
assert constants.ENDPOINT == endpoint, f"HF_ENDPOINT not picked up: {constants.ENDPOINT}"

api = HfApi()
url = api.create_repo(repo_id, exist_ok=True)
assert url.repo_id == repo_id and url.startswith(endpoint), repr(url)
api.create_repo(repo_id, exist_ok=True)  # second call gets a 409 that exist_ok must swallow

files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload test folder")
assert len(commit.oid) == 40, commit.oid
assert api.model_info(repo_id).sha == commit.oid
assert {s.rfilename for s in api.model_info(repo_id, revision=commit.oid).siblings} >= set(files)
assert set(api.list_repo_files(repo_id)) >= set(files), api.list_repo_files(repo_id)

for name in files:
    local = Path(hf_hub_download(repo_id, name))
    assert local.read_bytes() == (folder / name).read_bytes(), name
    assert f"/snapshots/{commit.oid}/" in local.as_posix(), local

snapshot = Path(snapshot_download(repo_id))
assert snapshot.name == commit.oid, snapshot
for name in files:
    assert (snapshot / name).read_bytes() == (folder / name).read_bytes(), name

errors = {}
try:
    hf_hub_download(repo_id, "missing.bin")
except EntryNotFoundError as e:
    errors["missing_file"] = type(e).__name__
try:
    hf_hub_download("popup-tests/does-not-exist", "weights.bin")
except RepositoryNotFoundError as e:
    errors["missing_repo"] = type(e).__name__
assert set(errors) == {"missing_file", "missing_repo"}, errors

print(json.dumps({"commit": commit.oid, "files": files, "errors": errors}))
"""

# Phase 2: same HF_HOME, HF_HUB_OFFLINE=1: cached files load, nothing reaches the network.
OFFLINE_CLIENT = r"""
import hashlib
import json
import sys
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError

repo_id, name, sha256 = sys.argv[1], sys.argv[2], sys.argv[3]
assert constants.HF_HUB_OFFLINE
data = Path(hf_hub_download(repo_id, name)).read_bytes()
assert hashlib.sha256(data).hexdigest() == sha256
try:
    hf_hub_download(repo_id, "never-downloaded.txt")
    raise AssertionError("an uncached file must not load offline")
except LocalEntryNotFoundError:
    pass
print(json.dumps({"ok": True}))
"""


def _run_client(tmp_path: Path, script: str, env: dict[str, str], *args: str) -> dict:
    path = tmp_path / f"client_{hashlib.sha1(script.encode()).hexdigest()[:8]}.py"
    path.write_text(script)
    proc = subprocess.run(
        [sys.executable, str(path), *args], env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )
    assert proc.returncode == 0, f"client failed (rc={proc.returncode})\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _make_folder(root: Path) -> Path:
    folder = root / "upload"
    (folder / "nested").mkdir(parents=True)
    # Every byte value, NULs and invalid UTF-8 included, so any text/encoding mangling shows up.
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 16 + hashlib.sha256(b"seed").digest())
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags: [edge-popup]\n---\n# Tiny masks\n")
    (folder / "nested" / "config.json").write_text(json.dumps({"k": 0.5}))
    return folder


def _http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None):
    """(status, headers, body) without raising on 4xx/5xx, and without any proxy from the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with opener.open(request, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def _commit(url: str, repo_id: str, files: dict[str, bytes], summary: str) -> str:
    lines = [{"key": "header", "value": {"summary": summary, "description": ""}}]
    lines += [
        {"key": "file", "value": {"path": p, "content": base64.b64encode(c).decode(), "encoding": "base64"}}
        for p, c in files.items()
    ]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    status, _, out = _http(
        "POST", f"{url}/api/models/{repo_id}/commit/main", body, {"Content-Type": "application/x-ndjson"}
    )
    assert status == 200, out
    return json.loads(out)["commitOid"]


def _create(url: str, repo_id: str) -> int:
    namespace, name = repo_id.split("/")
    payload = json.dumps({"name": name, "organization": namespace}).encode()
    return _http("POST", f"{url}/api/repos/create", payload, {"Content-Type": "application/json"})[0]


def test_huggingface_hub_round_trip_then_offline(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path)
    hf_home = tmp_path / "hf_home"
    server = HubServer()
    url = server.start()
    try:
        assert url.startswith("http://127.0.0.1:")
        result = _run_client(tmp_path, ONLINE_CLIENT, client_env(url, hf_home), url, REPO_ID, str(folder))

        assert result["files"] == ["README.md", "nested/config.json", "weights.bin"]
        assert result["errors"] == {
            "missing_file": "RemoteEntryNotFoundError",
            "missing_repo": "RepositoryNotFoundError",
        }
        status, _, info = _http("GET", f"{url}/api/models/{REPO_ID}")
        assert status == 200 and json.loads(info)["sha"] == result["commit"]

        routes = set(server.requests)
        # Legacy (non-Xet) upload flow: README metadata check, preupload, then a single NDJSON commit.
        assert ("POST", "/api/validate-yaml") in routes
        assert ("POST", f"/api/models/{REPO_ID}/preupload/main") in routes
        assert [r for r in server.requests if r[1].endswith("/commit/main")] == [
            ("POST", f"/api/models/{REPO_ID}/commit/main")
        ]
        assert not [path for _, path in routes if "lfs" in path or "xet" in path], routes

        before = len(server.requests)
        sha256 = hashlib.sha256((folder / "weights.bin").read_bytes()).hexdigest()
        offline_env = client_env(url, hf_home, HF_HUB_OFFLINE="1")
        assert _run_client(tmp_path, OFFLINE_CLIENT, offline_env, REPO_ID, "weights.bin", sha256) == {"ok": True}
        assert len(server.requests) == before, "offline mode must not contact the server"
    finally:
        server.stop()


def test_upload_with_xet_enabled_stays_on_regular_path(tmp_path: Path) -> None:
    # With hf_xet installed and not disabled, upload_folder takes the pipelined Xet path; answering
    # uploadMode "regular" must keep it off the CAS backend entirely.
    folder = _make_folder(tmp_path)
    server = HubServer()
    url = server.start()
    try:
        env = client_env(url, tmp_path / "hf_home")
        del env["HF_HUB_DISABLE_XET"]
        result = _run_client(tmp_path, ONLINE_CLIENT, env, url, REPO_ID, str(folder))
        assert len(result["commit"]) == 40
        assert not [path for _, path in server.requests if "lfs" in path or "xet" in path], server.requests
    finally:
        server.stop()


def test_context_manager_binds_loopback_and_cleans_up() -> None:
    server = HubServer()
    with server as url:
        assert url == server.url and url.startswith("http://127.0.0.1:")
        assert _http("GET", f"{url}/api/whoami-v2", headers={"Authorization": "Bearer dummy-token"})[0] == 200
    assert not server.root.exists()
    with pytest.raises(OSError):  # nothing listens on that port any more
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{url}/api/whoami-v2", timeout=2)


def test_http_contract_and_snapshots() -> None:
    server = HubServer(gitattributes=False)
    url = server.start()
    try:
        assert _create(url, REPO_ID) == 200
        assert _create(url, REPO_ID) == 409
        first = _commit(url, REPO_ID, {"a.bin": b"\x00one", "dir/b.txt": b"b"}, "first")
        second = _commit(url, REPO_ID, {"a.bin": b"\x00two"}, "second")
        assert first != second and len(second) == 40

        status, headers, body = _http("HEAD", f"{url}/{REPO_ID}/resolve/main/a.bin")
        assert (status, body) == (200, b"")
        assert headers["X-Repo-Commit"] == second
        assert headers["ETag"] == '"' + git_blob_sha1(b"\x00two") + '"'
        assert headers["Content-Length"] == "4"

        # Old commits stay addressable: main moved, the first snapshot did not.
        assert _http("GET", f"{url}/{REPO_ID}/resolve/{first}/a.bin")[2] == b"\x00one"
        assert _http("GET", f"{url}/{REPO_ID}/resolve/main/a.bin")[2] == b"\x00two"
        assert _http("GET", f"{url}/{REPO_ID}/resolve/main/dir/b.txt")[2] == b"b"
        status, headers, body = _http("GET", f"{url}/{REPO_ID}/resolve/main/a.bin", headers={"Range": "bytes=1-"})
        assert (status, body, headers["Content-Range"]) == (206, b"two", "bytes 1-3/4")

        status, headers, _ = _http("HEAD", f"{url}/{REPO_ID}/resolve/main/missing.bin")
        assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (404, "EntryNotFound", second)
        status, headers, _ = _http("HEAD", f"{url}/{REPO_ID}/resolve/nope/a.bin")
        assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
        # Missing repo: 401 for anonymous callers, 404 with a token, like the Hub.
        status, headers, _ = _http("HEAD", f"{url}/popup-tests/nope/resolve/main/a.bin")
        assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound")
        auth = {"Authorization": "Bearer dummy-token"}
        status, headers, _ = _http("GET", f"{url}/api/models/popup-tests/nope", headers=auth)
        assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")

        status, _, body = _http("GET", f"{url}/api/models/{REPO_ID}/tree/main?recursive=true")
        assert status == 200
        assert [(e["type"], e["path"]) for e in json.loads(body)] == [
            ("file", "a.bin"),
            ("directory", "dir"),
            ("file", "dir/b.txt"),
        ]
        status, _, body = _http("GET", f"{url}/api/models/{REPO_ID}/commits/main")
        assert [c["title"] for c in json.loads(body)] == ["second", "first", "initial commit"]

        preupload = json.dumps({"files": [{"path": "a.bin", "sample": "", "size": 4}]}).encode()
        status, _, body = _http("POST", f"{url}/api/models/{REPO_ID}/preupload/main", preupload)
        assert json.loads(body)["files"] == [
            {"path": "a.bin", "uploadMode": "regular", "shouldIgnore": False, "oid": git_blob_sha1(b"\x00two")}
        ]
    finally:
        server.stop()
    assert not server.root.exists(), "a temp root owned by the server is removed on stop()"


def _start_standalone(root: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(HUB_SERVER_SCRIPT), "--port", "0", "--root", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    if not ready:
        proc.kill()
        pytest.fail("standalone server did not print its url within 20 s")
    return proc, proc.stdout.readline().strip()


def _stop_standalone(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    return stderr


def test_standalone_cli_persists_root_across_restarts(tmp_path: Path) -> None:
    root = tmp_path / "hub-root"
    proc, url = _start_standalone(root)
    try:
        assert url.startswith("http://127.0.0.1:"), url
        assert _create(url, REPO_ID) == 200
        sha = _commit(url, REPO_ID, {"mask.bin": b"\x01\x02"}, "add mask")
    finally:
        assert _stop_standalone(proc) == ""  # silent unless something went wrong

    proc, url = _start_standalone(root)
    try:
        status, headers, body = _http("GET", f"{url}/{REPO_ID}/resolve/main/mask.bin")
        assert (status, body, headers["X-Repo-Commit"]) == (200, b"\x01\x02", sha)
    finally:
        _stop_standalone(proc)
    assert root.is_dir(), "an explicit --root is kept"
