"""``mlops ui``'s server: read-only, loopback only, serves the site and the reports it links to and nothing else,
rebuilds when runs change."""

import http.client
import threading
import time

import pytest

from pipelines.browser.server import Site, UIServer


@pytest.fixture
def served(make_run):
    make_run("r1", reports={"evaluation": (".html", "<html>eval</html>")})
    home = make_run.runs / "serving"
    home.mkdir()
    (home / "token").write_text("secret-token")
    server = UIServer(Site(make_run.runs, check_interval_s=0.0), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, make_run
    server.shutdown()
    server.server_close()


def request(server, method, path, host=None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    headers = {"Host": host} if host else {}
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), body


def test_serves_the_site_and_linked_reports_only(served):
    server, _ = served
    assert server.url.endswith("/ui/index.html")
    status, headers, _ = request(server, "GET", "/")
    assert status == 302 and headers["Location"] == "/ui/index.html"
    status, headers, body = request(server, "GET", "/ui/index.html")
    assert status == 200 and b'id="page-runs"' in body and headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert request(server, "GET", "/ui/run/r1.html")[0] == 200
    assert request(server, "GET", "/ui/assets/plotly.min.js")[0] == 200
    status, headers, body = request(server, "GET", "/r1/reports/evaluation.html")
    assert status == 200 and body == b"<html>eval</html>" and "Content-Security-Policy" not in headers
    for path in ("/serving/token", "/ui/../serving/token", "/ui/%2e%2e/serving/token", "/r1/summary.json",
                 "/r1/config.json", "/nope.html", "/ui/run/missing.html"):
        status, _, body = request(server, "GET", path)
        assert status == 404 and b"secret" not in body, path


def test_read_only_and_loopback_hosts_only(served):
    server, _ = served
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        status, headers, _ = request(server, method, "/ui/index.html")
        assert status == 405 and headers["Allow"] == "GET, HEAD", method
    status, headers, body = request(server, "HEAD", "/ui/index.html")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert request(server, "GET", "/ui/index.html", host="attacker.example:80")[0] == 421
    assert request(server, "GET", "/ui/index.html", host="localhost:1")[0] == 200


def test_refuses_a_non_loopback_bind_unless_asked(make_run):
    with pytest.raises(ValueError, match="not a loopback address.*--allow-remote"):
        UIServer(Site(make_run.runs), "0.0.0.0", 0)


def test_rebuilds_when_a_run_appears(served):
    server, make_run = served
    builds = server.site.builds
    assert request(server, "GET", "/ui/run/r2.html")[0] == 404
    make_run("r2")
    time.sleep(0.01)
    status, _, body = request(server, "GET", "/ui/index.html")
    assert status == 200 and b'data-run-id="r2"' in body
    assert request(server, "GET", "/ui/run/r2.html")[0] == 200
    assert server.site.builds == builds + 1
    request(server, "GET", "/ui/index.html")
    assert server.site.builds == builds + 1, "nothing changed: no rebuild"
