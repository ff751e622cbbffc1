"""An http function: a small server on $PORT that sfaas starts, warms and scales to zero."""
import http.server
import json
import os


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        name = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode() or "world"
        body = json.dumps({"greeting": f"hello, {name}", "pid": os.getpid()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
