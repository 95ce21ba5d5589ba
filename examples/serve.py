"""A minimal HTTP endpoint that streams a compressed decoder's tokens, with the standard library only
(plus onnxruntime, our kernels and tokenizers).

    python examples/serve.py slim/ --port 8000 --threads 4
    curl -N localhost:8000/generate -d '{"prompt": "The history of", "max_new_tokens": 64}'

POST /generate takes JSON {"prompt": str, "max_new_tokens": int (default 64, at most
--max-new-tokens), "temperature": float (default 0: greedy)} and answers text/plain in chunked
transfer encoding, one chunk per piece of text as it is generated. GET /health answers "ok".
Requests run in their own threads on one shared onnxruntime session (its Run is thread-safe).
It binds to 127.0.0.1 unless --host says otherwise: put a real server in front of it to expose it.
"""

from __future__ import annotations

import argparse
import json
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from edge import eos_ids, load_tokenizer, stream_text

from slim_onnx.generate import CachedDecoder

MAX_BODY = 1 << 20


def make_handler(decoder: CachedDecoder, tokenizer, eos: set[int], max_new_tokens: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked transfer encoding

        def _answer(self, status: HTTPStatus, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._answer(HTTPStatus.OK, "ok")
            else:
                self._answer(HTTPStatus.NOT_FOUND, "GET /health or POST /generate")

        def do_POST(self):
            if self.path != "/generate":
                return self._answer(HTTPStatus.NOT_FOUND, "POST /generate")
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if not 0 < length <= MAX_BODY:
                    raise ValueError(f"a JSON body of 1 byte to {MAX_BODY} bytes is needed")
                request = json.loads(self.rfile.read(length))
                prompt = request["prompt"]
                steps = int(request.get("max_new_tokens", max_new_tokens))
                temperature = float(request.get("temperature", 0.0))
                if not isinstance(prompt, str) or not prompt or not 0 < steps <= max_new_tokens or temperature < 0:
                    raise ValueError(f"expected a non-empty prompt, 1 <= max_new_tokens <= {max_new_tokens}, temperature >= 0")
            except (ValueError, KeyError, TypeError) as error:
                return self._answer(HTTPStatus.BAD_REQUEST, f"bad request: {error}\n")
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            tokens = decoder.tokens(tokenizer.encode(prompt).ids, steps, eos, temperature)
            for piece in stream_text(tokenizer, tokens):
                data = piece.encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, format, *args):  # one line per request on stderr
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a slim-onnx output folder (model.onnx, tokenizer.json)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the most a request may ask for")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    handler = make_handler(CachedDecoder(args.model, threads=args.threads), tokenizer, eos_ids(args.model),
                           args.max_new_tokens)
    server = ThreadingHTTPServer((args.host, args.port), handler)
    print(f"listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
