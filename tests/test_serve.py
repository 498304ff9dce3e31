"""`recsys.serve`: a real server on a free loopback port, exercised over HTTP, then stopped."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from recsys import export
from recsys.exported import load_exported
from tests.conftest import ROOT, compose_cfg
from tests.exports import make_run, write_data

pytest.importorskip("fastapi", reason="recsys.serve needs the `serve` extra (FastAPI, uvicorn)")
pytest.importorskip("uvicorn", reason="recsys.serve needs the `serve` extra (FastAPI, uvicorn)")

ROW = {"d0": 0.5, "d1": 1, "user": 3, "city": "city-2", "tags": [1, 2], "item": 4, "genre": "g1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: object = None, raw: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a POST of `body` as JSON (or of raw bytes)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def announce_body(url: str, path: str, size: int) -> tuple[int, dict]:
    """A POST whose headers announce a body of `size` bytes: answered before it is sent."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


class Server:
    """`python -m recsys.serve` in a process of its own on a free loopback port."""

    def __init__(self, *args: str):
        self.url = f"http://127.0.0.1:{(port := free_port())}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "recsys.serve", *args, f"port={port}", "max_rows=64"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited: {self.process.stdout.read()[-3000:]}")
            try:
                if call(f"{self.url}/health")[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not answer /health in 180 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("serve") / "data")


def test_a_ranking_export_is_served_and_bad_requests_get_4xx_naming_the_field(data, tmp_path):
    run = make_run(tmp_path / "run", data, "deepfm")
    out = tmp_path / "export"
    export.run(compose_cfg(f"run={run}", f"output={out}", config_name="export"))
    rows = [ROW, ROW | {"d0": None, "user": 999, "city": None, "tags": []}]
    expected = load_exported(out)({k: [r[k] for r in rows] for k in ROW})
    server = Server(f"run={out}")
    try:
        assert call(f"{server.url}/health") == (200, {"status": "ok", "model": "DeepFM",
                                                      "kind": "ranking"})  # fmt: skip
        status, schema = call(f"{server.url}/schema")
        assert status == 200 and schema["outputs"] == ["score", "probability"]
        assert schema["inputs"]["city"] == {"role": "categorical", "type": "string",
                                            "table_rows": 30}  # fmt: skip
        assert schema["inputs"]["d0"]["role"] == "dense"
        status, scored = call(f"{server.url}/score", {"rows": rows})
        assert status == 200
        np.testing.assert_allclose(scored["score"], expected["score"], atol=1e-6)
        np.testing.assert_allclose(scored["probability"], expected["probability"], atol=1e-6)
        bad = [
            ({"rows": [ROW, {k: v for k, v in ROW.items() if k != "city"}]}, 422, "'city'"),
            ({"rows": [ROW | {"d0": "high"}]}, 422, "column 'd0' (dense) has type string"),
            ({"rows": [ROW | {"user": [1.5]}]}, 422, "column 'user' (categorical)"),
            ({"rows": [ROW | {"tags": [1, "x"]}]}, 422, "column 'tags'"),
            ({"rows": []}, 422, "rows"),
            ({"items": [ROW]}, 422, "rows"),
            ({"rows": [ROW] * 65}, 413, "max_rows=64"),
        ]
        for body, code, named in bad:
            status, answer = call(f"{server.url}/score", body)
            assert status == code and named in json.dumps(answer), (body, answer)
        status, answer = call(f"{server.url}/score", raw=b'{"rows": [')
        assert status == 422, answer
        status, answer = announce_body(server.url, "/score", 17 << 20)
        assert status == 413 and "max_body_bytes" in answer["detail"]
        # still serving after the bad requests
        assert call(f"{server.url}/score", {"rows": rows})[1]["score"] == scored["score"]
    finally:
        server.stop()


def test_a_two_tower_run_is_served_with_encoders_and_top_k(data, tmp_path):
    run = make_run(tmp_path / "run", data, "two_tower")
    server = Server(f"run={run}", "k=3")
    try:
        out = tmp_path / "export"
        export.run(compose_cfg(f"run={run}", f"output={out}", config_name="export"))
        local = load_exported(out)
        users = [ROW, ROW | {"user": 7, "tags": None}]
        status, answer = call(f"{server.url}/recommend", {"rows": users, "k": 5})
        assert status == 200
        vectors = local.user({k: [u[k] for u in users] for k in local.user.columns})["embedding"]
        brute = vectors @ local.corpus_vectors.T
        for i in range(len(users)):
            best = np.argsort(-brute[i], kind="stable")[:5]
            assert answer["items"][i] == local.corpus_ids[best].tolist()
            np.testing.assert_allclose(answer["scores"][i], brute[i][best], atol=1e-5)
        assert len(call(f"{server.url}/recommend", {"rows": users})[1]["items"][0]) == 3
        status, encoded = call(f"{server.url}/encode/item", {"rows": [ROW]})
        assert status == 200 and len(encoded["embedding"][0]) == vectors.shape[1]
        status, answer = call(f"{server.url}/recommend", {"rows": users, "k": 0})
        assert status == 422 and "k" in json.dumps(answer)
        status, answer = call(f"{server.url}/encode/user", {"rows": [{"user": 1}]})
        assert status == 422 and "rows[0] has no field 'd0'" in answer["detail"]
        assert set(call(f"{server.url}/schema")[1]["inputs"]["item"]) == {"item", "genre", "d1"}
    finally:
        server.stop()
