"""A Hugging Face hub on loopback, serving dataset repositories from a local folder.

huggingface_hub and datasets reach it through HF_ENDPOINT exactly as they reach huggingface.co:
the tree API (listing), the revision API, and /resolve/ file downloads with HTTP ranges
(footers, streaming). A repository revision is the folder
<root>/<owner>/<name>/<revision, URL-quoted>/, so `refs/convert/parquet` is
`refs%2Fconvert%2Fparquet`. Only what those clients ask of the hub is implemented; every request
is recorded in `requests`.
"""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit


class LoopbackHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the tests read hub.requests instead
                pass

            def do_HEAD(self):
                hub.handle(self, head=True)

            def do_GET(self):
                hub.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # -- repository contents ------------------------------------------------------------------

    def folder(self, repo: str, revision: str) -> Path:
        return self.root / repo / quote(revision, safe="")

    @staticmethod
    def sha(revision: str) -> str:
        return hashlib.sha1(revision.encode()).hexdigest()

    def entry(self, base: Path, p: Path) -> dict:
        rel = p.relative_to(base).as_posix()
        if p.is_dir():
            return {"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "path": rel}
        st = p.stat()  # the oid only has to change when the file does
        oid = hashlib.sha1(f"{rel} {st.st_size} {st.st_mtime_ns}".encode()).hexdigest()
        return {"type": "file", "oid": oid, "size": st.st_size, "path": rel}

    # -- requests -----------------------------------------------------------------------------

    def handle(self, h, head: bool = False):
        url = urlsplit(h.path)
        self.requests.append(f"{h.command} {url.path}")
        parts = url.path.strip("/").split("/")  # raw: a quoted revision stays one segment
        query = parse_qs(url.query)
        try:
            if parts[:2] == ["api", "datasets"] and len(parts) >= 6 and parts[4] in ("tree", "revision"):
                repo, kind, revision = "/".join(parts[2:4]), parts[4], unquote(parts[5])
                base = self.folder(repo, revision)
                if not base.is_dir():
                    return self.send(h, 404, {"error": f"Revision Not Found for url {h.path}"},
                                     headers={"X-Error-Code": "RevisionNotFound"})
                if kind == "revision":
                    siblings = [{"rfilename": p.relative_to(base).as_posix()} for p in sorted(base.rglob("*")) if p.is_file()]
                    return self.send(h, 200, {"id": repo, "sha": self.sha(revision), "siblings": siblings})
                where = base / unquote("/".join(parts[6:]))
                if not where.is_dir():
                    return self.send(h, 404, {"error": "Entry Not Found"}, headers={"X-Error-Code": "EntryNotFound"})
                found = where.rglob("*") if query.get("recursive", ["false"])[0].lower() == "true" else where.iterdir()
                return self.send(h, 200, [self.entry(base, p) for p in sorted(found)])
            if parts[0] == "datasets" and len(parts) >= 6 and parts[3] == "resolve":
                repo, revision = "/".join(parts[1:3]), unquote(parts[4])
                f = self.folder(repo, revision) / unquote("/".join(parts[5:]))
                if not f.is_file():
                    return self.send(h, 404, {"error": "Entry Not Found"}, headers={"X-Error-Code": "EntryNotFound"})
                return self.send_file(h, f, revision, head)
            return self.send(h, 404, {"error": f"not served here: {h.path}"})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def send(self, h, status: int, body, headers=None):
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def send_file(self, h, f: Path, revision: str, head: bool):
        size = f.stat().st_size
        start, end, status = 0, size - 1, 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, b = rng[6:].split("-")
            if a == "":  # the last b bytes
                start = max(0, size - int(b))
            else:
                start, end = int(a), min(int(b), size - 1) if b else size - 1
            status = 206
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(end - start + 1))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{self.entry(f.parent, f)["oid"]}"')
        h.send_header("X-Repo-Commit", self.sha(revision))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        if not head:
            with open(f, "rb") as src:
                src.seek(start)
                h.wfile.write(src.read(end - start + 1))
