"""A tiny OpenAI-compatible chat-completions server on 127.0.0.1 for the LLM-judge tests.

It judges by content, so a client that maps letters back to policy / reference wrongly is caught:
it prefers the summary that contains the word "good" and answers in the N+ format. Posts containing
GARBAGE get a reply without a verdict, a prompt without a post (a connectivity check) "OK", FAIL always gets HTTP 500, BADREQ HTTP 400, FLAKY HTTP 500 the
first time only. With ``always`` set it answers that letter whatever the content. Every request is
recorded. The server runs in a daemon thread and is shut down by ``stop()`` (bounded: each request
handler returns at once)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeServer:
    def __init__(self, always: str | None = None):
        self.requests: list[dict] = []
        self.always = always
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                prompt = body["messages"][-1]["content"]
                status, reply = outer.answer(prompt)
                if status != 200:
                    self.send_response(status)
                    self.end_headers()
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, prompt: str) -> tuple[int, str]:
        if "### Post:" not in prompt:  # a connectivity check
            return 200, "OK"
        post = prompt.split("### Post:")[1].split("### Summary A:")[0]
        a = prompt.split("### Summary A:")[1].split("### Summary B:")[0]
        if "FAIL" in post:
            return 500, ""
        if "BADREQ" in post:
            return 400, ""
        if "FLAKY" in post:
            with self._lock:
                first = post not in self._seen
                self._seen.add(post)
            if first:
                return 500, ""
        if "GARBAGE" in post:
            return 200, "Both summaries are fine, I cannot decide."
        if self.always:
            return 200, f"Comparison: fixed answer.\nPreferred: {self.always}"
        letter = "A" if re.search(r"\bgood\b", a) else "B"
        return 200, f"Comparison: Summary {letter} is more accurate.\nPreferred: {letter}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
