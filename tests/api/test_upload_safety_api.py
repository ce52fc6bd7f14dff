"""Malicious and malformed checkpoint uploads: each a 4xx that says what is wrong, nothing executed,
nothing stored (no artifact file, no version row, no audit event)."""

from __future__ import annotations

import io
import json
import pickle
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import pytest
import torch
from fastapi.testclient import TestClient

from api.app import create_app
from api_helpers import assert_problem, authorize, make_keys
from core.architectures import build_model
from core.checkpoint import checkpoint_bytes, load_checkpoint_bytes
from core.settings import Settings

MARKER = "PWNED-by-upload"


class _Payload:
    """Unpickling this writes a file: proof that something was executed."""

    def __reduce__(self):  # noqa: ANN204
        return (exec, (f"import pathlib; pathlib.Path({MARKER!r}).write_text('x')",))


def _pickle(_good: bytes) -> bytes:
    return pickle.dumps({"state_dict": _Payload()}, protocol=4)


def _torch_zip(_good: bytes) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(3), "evil": _Payload()}, buffer)  # a real .pt file
    return buffer.getvalue()


def _mutate_header(data: bytes, change: Callable[[dict], None]) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    change(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


def _header_overflow(good: bytes) -> bytes:
    return struct.pack("<Q", 2**63) + good[8:]


def _overlapping(good: bytes) -> bytes:
    def change(header: dict) -> None:
        tensors = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        first, second = header[tensors[0]], header[tensors[1]]
        size = second["data_offsets"][1] - second["data_offsets"][0]
        second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]  # on top of the first

    return _mutate_header(good, change)


def _wrong_shapes(good: bytes) -> bytes:
    _, manifest = load_checkpoint_bytes(good)
    five = manifest.model_copy(update={"num_classes": 5, "class_names": list("abcde")})
    return checkpoint_bytes(build_model("smallcnn", 1, 5), five)


def _nan(good: bytes) -> bytes:
    model, manifest = load_checkpoint_bytes(good)
    with torch.no_grad():
        next(p for p in model.parameters()).view(-1)[0] = float("nan")
    return checkpoint_bytes(model, manifest)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_pickle, "this is a Python pickle (protocol 4"),
        (_torch_zip, "this is a zip archive, the format of torch.save"),
        (_header_overflow, "header length (9223372036854775808 bytes) is out of bounds"),
        (_overlapping, "tensor data overlap"),
        (_wrong_shapes, "shape [5"),
        (_nan, "holds NaN or Inf"),
        (lambda good: good[: len(good) // 2], "data offsets lie outside the file"),
    ],
    ids=["pickle", "torch-zip", "header-overflow", "overlapping-offsets", "wrong-shapes", "nan", "truncated"],
)
def test_a_bad_checkpoint_is_refused_unexecuted_and_unstored(
    client: TestClient, registered_model, digits_checkpoint: bytes, make, message: str,  # noqa: ANN001
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # where the payload would write its marker
    model = registered_model(upload=False)
    artifacts = client.app.state.settings.effective_artifact_dir
    before = sorted(artifacts.rglob("*")) if artifacts.exists() else []

    files = {"file": ("model.safetensors", make(digits_checkpoint), "application/octet-stream")}
    response = client.post(f"/models/{model['id']}/versions", files=files)

    assert_problem(response, 422, "invalid_checkpoint", message)
    assert not (tmp_path / MARKER).exists()
    assert (sorted(artifacts.rglob("*")) if artifacts.exists() else []) == before
    assert client.get(f"/models/{model['id']}/versions").json()["versions"] == []
    events = client.get("/audit-events", params={"model_id": model["id"]}).json()["audit_events"]
    assert [e["action"] for e in events] == ["model.created"]


def test_oversized_checkpoints_are_refused(tmp_path: Path, digits_checkpoint: bytes) -> None:
    parameters = sum(p.numel() for p in load_checkpoint_bytes(digits_checkpoint)[0].state_dict().values())
    spec = {"name": "m", "architecture": "smallcnn", "num_classes": 10, "input_shape": [1, 8, 8],
            "mean": [0.3], "std": [0.4], "data_source": "digits"}
    with TestClient(create_app(Settings(home=tmp_path))) as client:
        authorize(client)
        model_id = client.post("/models", json=spec).json()["id"]
    # The limit lowered after the model was registered (which checks it too): uploads still obey it.
    settings = Settings(home=tmp_path, max_checkpoint_parameters=parameters - 1, max_upload_bytes=len(digits_checkpoint) + 10)
    with TestClient(create_app(settings)) as client:
        authorize(client)

        def upload(data: bytes):  # noqa: ANN202
            return client.post(f"/models/{model_id}/versions", files={"file": ("m.safetensors", data)})

        assert_problem(upload(digits_checkpoint), 422, "invalid_checkpoint", f"more than {parameters - 1} parameters")
        assert_problem(upload(digits_checkpoint + b"\0" * 64), 413, "checkpoint_too_large", "the limit is")
        assert client.get(f"/models/{model_id}/versions").json()["versions"] == []
        stored = settings.effective_artifact_dir
        assert not stored.exists() or not [path for path in stored.rglob("*") if path.is_file()]


def test_uploads_beyond_what_a_process_checks_at_once_wait_then_get_503(
    tmp_path: Path, digits_checkpoint: bytes, model_spec: dict
) -> None:
    spec = model_spec
    settings = Settings(home=tmp_path, max_concurrent_uploads=1, upload_wait_s=0.2)
    with TestClient(create_app(settings)) as client:
        authorize(client)
        model_id = client.post("/models", json=spec).json()["id"]

        def upload():  # noqa: ANN202
            return client.post(f"/models/{model_id}/versions", files={"file": ("m.safetensors", digits_checkpoint)})

        slots = client.app.state.upload_slots
        client.portal.call(slots.acquire)  # another upload (each holds its file in memory) is being checked
        try:
            busy = upload()
        finally:
            client.portal.call(slots.release)

        assert_problem(busy, 503, "server_busy", "checking 1 other checkpoint uploads")
        assert busy.headers["retry-after"] == "5"
        assert client.get(f"/models/{model_id}/versions").json()["versions"] == []
        assert upload().status_code == 201  # the slot is free again


def test_uploads_beyond_what_a_process_receives_at_once_get_503_before_a_byte_is_read(
    tmp_path: Path, digits_checkpoint: bytes, model_spec: dict
) -> None:
    # Each body is spooled to a temporary file before it is checked: without a bound, one admin
    # key's burst of large uploads would fill the API host's disk.
    with TestClient(create_app(Settings(home=tmp_path, max_receiving_uploads=1))) as client:
        authorize(client)
        model_id = client.post("/models", json=model_spec).json()["id"]

        def upload():  # noqa: ANN202
            return client.post(f"/models/{model_id}/versions", files={"file": ("m.safetensors", digits_checkpoint)})

        receiving = client.app.state.receiving_uploads
        client.portal.call(receiving.acquire)  # another upload's body is arriving
        try:
            busy = upload()
        finally:
            client.portal.call(receiving.release)

        assert_problem(busy, 503, "server_busy", "receiving 1 other checkpoint uploads")
        assert busy.headers["retry-after"] == "5" and busy.headers["connection"] == "close"
        assert upload().status_code == 201  # the slot is free again


def _trickled_upload(
    client: TestClient, admin_key: str, path: str, body: bytes, pause_s: float, *, stall: bool = False
) -> tuple[int, dict]:
    """An upload sent in 8 parts, `pause_s` apart; with `stall`, the sender then stops before the
    end of the body, the connection kept open."""
    size = -(-len(body) // 8)
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    answer: list[dict] = []

    async def upload() -> None:
        sent = 0

        async def receive() -> dict:
            nonlocal sent
            if sent == len(parts):
                await anyio.sleep_forever()
            if sent:
                await anyio.sleep(pause_s)
            sent += 1
            return {"type": "http.request", "body": parts[sent - 1], "more_body": stall or sent < len(parts)}

        async def send(message: dict) -> None:
            answer.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {admin_key}".encode()),
                             (b"content-type", b"multipart/form-data; boundary=x")],
                 "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
        with anyio.fail_after(10):
            await client.app(scope, receive, send)

    client.portal.call(upload)
    start = next(m for m in answer if m["type"] == "http.response.start")
    return start["status"], json.loads(b"".join(m.get("body", b"") for m in answer if m["type"] == "http.response.body"))


def _multipart(content: bytes) -> bytes:
    return (b'--x\r\nContent-Disposition: form-data; name="file"; filename="m.safetensors"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n--x--\r\n")


def test_an_upload_whose_body_stalls_is_408_and_frees_its_slot(
    tmp_path: Path, digits_checkpoint: bytes, model_spec: dict
) -> None:
    settings = Settings(home=tmp_path, max_receiving_uploads=1, upload_idle_timeout_s=0.3)
    with TestClient(create_app(settings)) as client:
        keys = authorize(client)
        path = f"/models/{client.post('/models', json=model_spec).json()['id']}/versions"

        status, problem = _trickled_upload(client, keys.admin, path, _multipart(digits_checkpoint), 0.0, stall=True)

        assert status == 408 and problem["code"] == "request_timeout" and "for 0.3 s" in problem["detail"]
        assert client.post(path, files={"file": ("m.safetensors", digits_checkpoint)}).status_code == 201


def test_a_slow_but_steady_upload_is_received_however_long_it_takes(
    tmp_path: Path, digits_checkpoint: bytes, model_spec: dict
) -> None:
    settings = Settings(home=tmp_path, upload_idle_timeout_s=0.3)  # 8 parts, 0.15 s apart: 1 s in all
    with TestClient(create_app(settings)) as client:
        keys = authorize(client)
        path = f"/models/{client.post('/models', json=model_spec).json()['id']}/versions"

        status, version = _trickled_upload(client, keys.admin, path, _multipart(digits_checkpoint), 0.15)

    assert status == 201 and version["version"] == 1


def test_behind_a_path_prefix_an_upload_is_still_one_and_not_held_to_the_json_limit(
    tmp_path: Path, model_spec: dict
) -> None:
    # uvicorn --root-path /uisps (a proxy serving the API under /uisps): ASGI's path then starts
    # with the prefix, which routing strips; so must the limits, or every upload over 1 MiB is 413.
    with TestClient(create_app(Settings(home=tmp_path))) as client:
        keys = authorize(client)
        path = f"/uisps/models/{client.post('/models', json=model_spec).json()['id']}/versions"
        body = _multipart(b"\0" * (1024 * 1024 + 10))  # over the 1 MiB of a JSON body, not a checkpoint
        answer: list[dict] = []

        async def upload() -> None:
            async def receive() -> dict:
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message: dict) -> None:
                answer.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "/uisps",
                     "query_string": b"", "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
                     "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {keys.admin}".encode()),
                                 (b"content-type", b"multipart/form-data; boundary=x"),
                                 (b"content-length", str(len(body)).encode())]}
            await client.app(scope, receive, send)

        client.portal.call(upload)

    problem = json.loads(b"".join(m.get("body", b"") for m in answer if m["type"] == "http.response.body"))
    assert (problem["status"], problem["code"]) == (422, "invalid_checkpoint")  # checked as a checkpoint


def test_an_upload_waiting_for_a_slot_holds_no_thread_other_requests_need(
    tmp_path: Path, digits_checkpoint: bytes, model_spec: dict
) -> None:
    # Uploads beyond the slots wait; were they to wait in the threads that run every endpoint, one
    # tenant's burst of uploads would stall every other tenant's requests until the waits ran out.
    settings = Settings(home=tmp_path, max_concurrent_uploads=1, upload_wait_s=30)
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(1) as pool:
        authorize(client)
        model_id = client.post("/models", json=model_spec).json()["id"]
        slots = client.app.state.upload_slots
        client.portal.call(slots.acquire)
        client.portal.call(lambda: setattr(anyio.to_thread.current_default_thread_limiter(), "total_tokens", 1))
        try:
            waiting = pool.submit(client.post, f"/models/{model_id}/versions",
                                  files={"file": ("m.safetensors", digits_checkpoint)})
            while client.portal.call(slots.statistics).tasks_waiting == 0:
                assert not waiting.done(), waiting.result().text
                time.sleep(0.01)

            listed = client.get("/models")

            assert listed.status_code == 200 and not waiting.done()  # answered while the upload waits
        finally:
            client.portal.call(slots.release)
        assert waiting.result().status_code == 201


def test_with_no_wait_an_upload_takes_a_free_slot(tmp_path: Path, digits_checkpoint: bytes, model_spec: dict) -> None:
    with TestClient(create_app(Settings(home=tmp_path, upload_wait_s=0))) as client:
        authorize(client)
        model_id = client.post("/models", json=model_spec).json()["id"]

        response = client.post(f"/models/{model_id}/versions", files={"file": ("m.safetensors", digits_checkpoint)})

    assert response.status_code == 201, response.text


def test_an_upload_checked_for_longer_than_the_wait_still_completes(
    tmp_path: Path, digits_checkpoint: bytes, model_spec: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.services.models import service

    check = service._validate_checkpoint

    def slow_check(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        time.sleep(0.5)
        return check(*args, **kwargs)

    monkeypatch.setattr(service, "_validate_checkpoint", slow_check)
    with TestClient(create_app(Settings(home=tmp_path, upload_wait_s=0.1))) as client:
        authorize(client)
        model_id = client.post("/models", json=model_spec).json()["id"]

        response = client.post(f"/models/{model_id}/versions", files={"file": ("m.safetensors", digits_checkpoint)})

    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    ("key", "status", "code"),
    [("uisps_" + "A" * 43, 401, "unauthenticated"), ("reader", 403, "forbidden"), (None, 401, "unauthenticated")],
)
def test_an_upload_without_an_admin_key_is_refused_before_its_body_is_read(
    client: TestClient, registered_model, key: str | None, status: int, code: str  # noqa: ANN001
) -> None:
    model = registered_model(upload=False)
    sent: list[bytes] = []

    def body() -> Iterator[bytes]:  # 512 MiB, were it all read
        for _ in range(512):
            sent.append(b"")
            yield b"\0" * (1024 * 1024)

    headers = {"content-type": "multipart/form-data; boundary=x"}
    if key is not None:
        keys = make_keys(client.app.state.sessions)
        headers["authorization"] = f"Bearer {getattr(keys, key) if key == 'reader' else key}"
    response = client.post(f"/models/{model['id']}/versions", content=body(), headers=headers, auth=None)

    assert_problem(response, status, code)
    assert sent == [] and response.headers["connection"] == "close"


def test_a_post_to_a_versions_path_that_is_no_upload_route_is_404_not_403(client: TestClient) -> None:
    # only POST /models/{id}/versions takes a checkpoint: other paths ending in /versions are no route
    reader = make_keys(client.app.state.sessions).header("reader")

    response = client.post("/deletion-requests/abc/versions", json={}, headers=reader)

    assert_problem(response, 404, "not_found")
