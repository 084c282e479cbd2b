"""A Hugging Face hub on 127.0.0.1 for the tests: model repos served from local folders.

Only what huggingface_hub's ``snapshot_download`` asks for: the repo's commit
(``GET /api/models/<id>/revision/<rev>``), its file list (``GET /api/models/<id>/tree/<rev>``),
and each file's metadata and bytes (``HEAD`` / ``GET /<id>/resolve/<rev>/<file>``, with the
``X-Repo-Commit``, ``ETag`` and ``Content-Length`` headers it checks, and ``Range`` requests).
A repo not served answers 404 ``RepoNotFound``; a gated one 401 ``GatedRepo``, as the hub does.
Every request is recorded; a file can be cut short, or refused with HTTP 500, the first time
it is fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self, repos: dict[str, str], gated: tuple[str, ...] = ()):
        self.repos = {rid: Path(folder) for rid, folder in repos.items()}
        self.gated = set(gated)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cut_once: set[str] = set()  # file names whose first GET stops halfway
        self.fail_once: set[str] = set()  # file names whose first GET answers 500
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def file_gets(self, since: int = 0) -> list[str]:
        """The paths of the file downloads (GET .../resolve/...) from request number ``since`` on."""
        return [p for m, p, _ in self.requests[since:] if m == "GET" and "/resolve/" in p]

    @staticmethod
    def commit(repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def _files(self, repo_id: str) -> dict[str, bytes]:
        folder = self.repos[repo_id]
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def send(self, status: int, headers: dict, data: bytes = b"", body: bool = True) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, str(v))
                self.send_header("Content-Length", str(headers.get("Content-Length", len(data))))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def refuse(self, status: int, code: str, body: bool) -> None:
                self.send(status, {"X-Error-Code": code}, json.dumps({"error": code}).encode(), body)

            def answer(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                api = parts[:2] == ["api", "models"]
                if api:
                    parts = parts[2:]
                repo_id = "/".join(parts[:2])
                if repo_id in hub.gated:
                    return self.refuse(401, "GatedRepo", body)
                if repo_id not in hub.repos:
                    return self.refuse(404, "RepoNotFound", body)
                files, sha = hub._files(repo_id), hub.commit(repo_id)
                kind, rest = parts[2] if len(parts) > 2 else "", parts[3:]
                if api and kind == "revision":
                    siblings = [{"rfilename": name} for name in files]
                    info = {"id": repo_id, "modelId": repo_id, "sha": sha, "siblings": siblings, "private": False}
                    return self.send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)
                if api and kind == "tree":
                    tree = [
                        {"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for n, d in files.items()
                    ]
                    return self.send(200, {"Content-Type": "application/json"}, json.dumps(tree).encode(), body)
                if not api and kind == "resolve" and len(rest) == 2 and rest[0] in ("main", sha) and rest[1] in files:
                    return self.file(rest[1], files[rest[1]], sha, body)
                return self.refuse(404, "EntryNotFound", body)

            def file(self, name: str, data: bytes, sha: str, body: bool) -> None:
                headers = {
                    "X-Repo-Commit": sha,
                    "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                    "Accept-Ranges": "bytes",
                }
                if not body:
                    return self.send(200, {**headers, "Content-Length": len(data)}, body=False)
                if name in hub.fail_once:
                    hub.fail_once.discard(name)
                    return self.send(500, {}, b"internal error")
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[len("bytes=") : -1])
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                part = data[start:]
                if name in hub.cut_once:  # the full length announced, 7/8 of it sent, the connection closed
                    hub.cut_once.discard(name)
                    self.send_response(200)
                    for k, v in {**headers, "Content-Length": len(part)}.items():
                        self.send_header(k, str(v))
                    self.end_headers()
                    self.wfile.write(part[: len(part) * 7 // 8])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.send(206 if start else 200, headers, part)

        return Handler
