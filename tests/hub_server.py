"""A small Hub-protocol server on loopback, for testing hf_vq against the real `huggingface_hub` client.

It speaks the subset of the Hugging Face Hub HTTP API that `create_repo`, `upload_folder` /
`create_commit` (regular, non-LFS uploads), `model_info`, `list_repo_tree`, `hf_hub_download` and
`snapshot_download` use (see REFERENCE.md §4), with tokens, private repos and git-like commit
history kept in memory. Fault injection: `drop_next_commits` makes the server close the connection
on that many commit requests without answering (a connection dropped mid-upload).

This is test infrastructure, not part of the library: the client under test is the unmodified
`huggingface_hub` talking HTTP to this process.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer"]


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Repo:
    repo_id: str
    private: bool
    owner: str
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, {path: content}), oldest first

    def snapshot(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision in ("main", "HEAD"):
            return self.commits[-1]
        return next((c for c in self.commits if c[0] == revision or c[0].startswith(revision) and len(revision) >= 7), None)


class HubServer:
    """`with HubServer(tokens={"hf_alice_write": "alice"}) as hub: hub.endpoint -> "http://127.0.0.1:PORT"`."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens or {})  # token -> user name
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) log
        self.drop_next_commits = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever and would block if it never ran
            self._server.shutdown()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].snapshot(revision)[1])

    # ------------------------------------------------------------------------------------------ handler
    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            # ---------------------------------------------------------------- plumbing
            def _send(self, status: int, body: bytes | dict | list | None = None, headers: dict | None = None,
                      head: bool = False) -> None:
                if isinstance(body, (dict, list)):
                    body = json.dumps(body).encode()
                    headers = {"Content-Type": "application/json", **(headers or {})}
                body = body or b""
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, str(value))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
                headers = {"X-Error-Message": message}
                if code:
                    headers["X-Error-Code"] = code
                self._send(status, {"error": message}, headers, head=head)

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _user(self) -> str | None | bool:
                """The authenticated user, None if no token, False if the token is wrong."""
                auth = self.headers.get("Authorization") or ""
                if not auth.startswith("Bearer "):
                    return None
                return hub.tokens.get(auth[len("Bearer "):], False)

            def _repo(self, repo_id: str, *, write: bool = False, head: bool = False) -> _Repo | None:
                user = self._user()
                if user is False:
                    self._error(401, "Invalid credentials in Authorization header", "InvalidCredentials", head=head)
                    return None
                repo = hub.repos.get(repo_id)
                if repo is None or (repo.private and user != repo.owner):
                    self._error(401 if user is None else 404, f"Repository Not Found for url: {self.path}.",
                                "RepoNotFound", head=head)
                    return None
                if write and user != repo.owner:
                    self._error(403, f"You don't have the rights to write to {repo_id}.", "Forbidden")
                    return None
                return repo

            # ---------------------------------------------------------------- verbs
            def do_HEAD(self) -> None:
                self._route("HEAD")

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def _route(self, method: str) -> None:
                url = urlsplit(self.path)
                path, query = unquote(url.path), parse_qs(url.query)
                hub.requests.append((method, path))
                parts = path.strip("/").split("/")
                try:
                    if method == "GET" and path == "/api/whoami-v2":
                        return self._whoami()
                    if method == "POST" and path == "/api/repos/create":
                        return self._create_repo()
                    if method == "POST" and path == "/api/validate-yaml":
                        self._body()
                        return self._send(200, {"errors": [], "warnings": []})
                    if parts[:2] == ["api", "models"] and len(parts) >= 4:
                        return self._api_models(method, parts[2] + "/" + parts[3], parts[4:], query)
                    if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                        return self._resolve(method, parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]))
                    self._error(404, f"no route for {method} {path}")
                except ConnectionError:
                    pass

            def _whoami(self) -> None:
                user = self._user()
                if not user:
                    return self._error(401, "Invalid credentials in Authorization header", "InvalidCredentials")
                self._send(200, {"type": "user", "name": user, "orgs": [],
                                 "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

            def _create_repo(self) -> None:
                data = json.loads(self._body() or b"{}")
                user = self._user()
                if not user:
                    return self._error(401, "You must be authenticated to create a repo.", "InvalidCredentials")
                namespace = data.get("organization") or user
                if namespace != user:
                    return self._error(403, f"You don't have the rights to create a repo under {namespace}.")
                repo_id = f"{namespace}/{data['name']}"
                with hub._lock:
                    if repo_id in hub.repos:
                        return self._send(409, {"error": "You already created this model repo",
                                                "url": f"{hub.endpoint}/{repo_id}"},
                                          {"X-Error-Message": "You already created this model repo"})
                    private = bool(data.get("private")) or data.get("visibility") in ("private", "protected")
                    repo = _Repo(repo_id, private, user)
                    initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
                    repo.commits.append((hashlib.sha1(repo_id.encode()).hexdigest(), initial))
                    hub.repos[repo_id] = repo
                self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

            def _api_models(self, method: str, repo_id: str, rest: list[str], query: dict) -> None:
                if method == "POST" and rest[:1] == ["preupload"]:
                    data = json.loads(self._body() or b"{}")
                    repo = self._repo(repo_id, write=True)
                    if repo is None:
                        return
                    files = repo.snapshot("main")[1]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                         "oid": _git_blob_oid(files[f["path"]]) if f["path"] in files else None}
                        for f in data.get("files", [])]})
                if method == "POST" and rest[:1] == ["commit"]:
                    return self._commit(repo_id, "/".join(rest[1:]) or "main")
                if method != "GET":
                    return self._error(405, "method not allowed")
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if not rest or rest[0] == "revision":
                    snap = repo.snapshot(rest[1] if len(rest) > 1 else "main")
                    if snap is None:
                        return self._error(404, f"Invalid rev id: {rest[1]}", "RevisionNotFound")
                    sha, files = snap
                    return self._send(200, {
                        "id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "author": repo.owner,
                        "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(files.items())],
                        "lastModified": "2026-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
                    })
                if rest[0] == "tree":
                    snap = repo.snapshot(rest[1] if len(rest) > 1 else "main")
                    if snap is None:
                        return self._error(404, "Invalid rev id", "RevisionNotFound")
                    prefix = "/".join(rest[2:]).strip("/")
                    recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                    return self._tree(snap[1], prefix, recursive)
                self._error(404, f"no route for {self.path}")

            def _tree(self, files: dict[str, bytes], prefix: str, recursive: bool) -> None:
                entries, dirs = [], set()
                inside = {p: b for p, b in files.items() if not prefix or p.startswith(prefix + "/")}
                if prefix and not inside:
                    return self._error(404, f"{prefix} does not exist", "EntryNotFound")
                for path, data in sorted(inside.items()):
                    rel = path[len(prefix) + 1:] if prefix else path
                    if "/" in rel and not recursive:
                        dirs.add((prefix + "/" if prefix else "") + rel.split("/")[0])
                        continue
                    if recursive:
                        for i in range(1, rel.count("/") + 1):
                            dirs.add((prefix + "/" if prefix else "") + "/".join(rel.split("/")[:i]))
                    entries.append({"type": "file", "oid": _git_blob_oid(data), "size": len(data), "path": path})
                entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
                self._send(200, entries)

            def _commit(self, repo_id: str, revision: str) -> None:
                body = self._body()
                if hub.drop_next_commits > 0:
                    hub.drop_next_commits -= 1
                    self.close_connection = True
                    self.connection.shutdown(2)  # the connection dies mid-upload: no answer at all
                    raise ConnectionError
                repo = self._repo(repo_id, write=True)
                if repo is None:
                    return
                if revision != "main":
                    return self._error(400, "this test server only commits to main", "RevisionNotFound")
                with hub._lock:
                    files = dict(repo.snapshot("main")[1])
                    summary = ""
                    for line in body.splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        key, value = item["key"], item["value"]
                        if key == "header":
                            summary = value.get("summary", "")
                        elif key == "file":
                            files[value["path"]] = base64.b64decode(value["content"])
                        elif key == "deletedFile":
                            files.pop(value["path"], None)
                        elif key == "deletedFolder":
                            files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                        else:
                            return self._error(400, f"unsupported commit operation {key!r} (LFS is not served here)")
                    sha = hashlib.sha1(repr((repo.commits[-1][0], summary, time.time_ns())).encode()).hexdigest()
                    repo.commits.append((sha, files))
                self._send(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                                 "pullRequestUrl": None, "success": True})

            def _resolve(self, method: str, repo_id: str, revision: str, filename: str) -> None:
                head = method == "HEAD"
                repo = self._repo(repo_id, head=head)
                if repo is None:
                    return
                snap = repo.snapshot(revision)
                if snap is None:
                    return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
                sha, files = snap
                if filename not in files:
                    return self._error(404, f"Entry not found: {filename}", "EntryNotFound", head=head)
                data = files[filename]
                headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_blob_oid(data)}"',
                           "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
                status = 200
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and not head:
                    start, _, end = rng[len("bytes="):].partition("-")
                    end_i = int(end) if end else len(data) - 1
                    data = data[int(start):end_i + 1]
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{end_i}/{len(files[filename])}"
                if head:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return
                self._send(status, data, headers)

        return Handler

