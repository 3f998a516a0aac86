"""``mlops predict``: image files and a built-in digit go to the served endpoint with the serving state's token;
each gets its class and confidence; a bad file fails alone; nothing served is a clear error."""

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from pipelines.commands import serve as serve_cmd

TOKEN = "client-token-123"


@pytest.fixture
def endpoint(tmp_path, monkeypatch):
    """A stand-in for the auth proxy: checks the bearer token, decodes the image with Pillow as TorchServe's handler
    does, answers like the handler; ``seen`` keeps (content type, Pillow format, size, pixels) of each request."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self.send_response(401)
                self.end_headers()
                return
            image = Image.open(io.BytesIO(body))
            seen.append((self.headers["Content-Type"], image.format, image.size, np.asarray(image.convert("L"))))
            answer = json.dumps({"label": "3", "class_index": 3, "confidence": 0.97, "probabilities": [],
                                 "model_version": "abc123"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    url = f"http://127.0.0.1:{server.server_address[1]}/predictions/digits"
    monkeypatch.setattr(serve_cmd, "served_endpoint",
                        lambda home: {"running": True, "endpoint": url, "token_file": str(token_file)})
    yield seen
    server.shutdown()
    server.server_close()


def test_digit_is_a_real_handwritten_digit_sent_as_png(endpoint, tmp_path, run_cli):
    from sklearn.datasets import load_digits

    saved = tmp_path / "digit.png"
    code, out, err = run_cli(["predict", "--digit", "3", "--save", str(saved)])
    assert code == 0, err
    ((content_type, fmt, size, pixels),) = endpoint
    assert (content_type, fmt, size) == ("image/png", "PNG", (8, 8))
    data = load_digits()
    first_three = data.images[list(data.target).index(3)]
    assert np.abs(pixels / 255.0 - first_three / 16.0).max() < 0.01
    assert saved.read_bytes().startswith(b"\x89PNG"), "--save keeps the PNG for curl"
    assert f"{saved}: 3 (confidence 0.970)" in out


def test_files_of_any_size_and_a_bad_one(endpoint, tmp_path, run_cli):
    jpeg, png, text = tmp_path / "photo.jpg", tmp_path / "big.png", tmp_path / "notes.txt"
    Image.fromarray(np.full((60, 100, 3), 200, np.uint8)).save(jpeg, format="JPEG")
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(png, format="PNG")
    text.write_text("not an image")
    code, out, err = run_cli(["predict", str(jpeg), str(text), str(png), "--json"])
    assert code == 1, "one file failed"
    assert [(t, f, s) for t, f, s, _ in endpoint] == [("image/jpeg", "JPEG", (100, 60)), ("image/png", "PNG", (300, 300))]
    result = json.loads(out)  # stdout holds only the JSON
    by_file = {r["file"]: r for r in result["predictions"]}
    assert by_file[str(jpeg)]["class_index"] == 3 and by_file[str(png)]["confidence"] == 0.97
    assert "not a PNG or JPEG" in by_file[str(text)]["error"] and "ERROR" in err


def test_a_missing_file_sends_nothing(endpoint, tmp_path, run_cli):
    code, _, err = run_cli(["predict", "--digit", "1", str(tmp_path / "missing.png")])
    assert code == 1 and endpoint == [] and "missing.png" in err


def test_nothing_served_says_what_to_do(tmp_path, run_cli):
    code, _, err = run_cli(["predict", "--digit", "0", "--serving-home", str(tmp_path / "serving")])
    assert code == 1 and "no model is served from" in err and "mlops serve start" in err


def test_no_input_is_a_clear_error(run_cli):
    code, _, err = run_cli(["predict"])
    assert code == 1 and "--digit N" in err
