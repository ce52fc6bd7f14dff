"""/models and their versions over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import errno
import hashlib
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save

from api.app import create_app
from api_helpers import assert_problem, authorize, unique_name
from core.checkpoint import MANIFEST_KEY, checkpoint_bytes, load_checkpoint_bytes
from core.services.pagination import DEFAULT_PAGE_SIZE, encode_token
from core.settings import Settings
import core.storage as storage_module
from core.storage import key_for


def _upload(client: TestClient, model_id: str, data: bytes):  # noqa: ANN202
    return client.post(f"/models/{model_id}/versions", files={"file": ("m.safetensors", data, "application/octet-stream")})


def _actions(client: TestClient, model_id: str) -> list[str]:
    events = client.get("/audit-events", params={"model_id": model_id, "page_size": 1000}).json()["audit_events"]
    return [e["action"] for e in events]


def test_register_a_model(client: TestClient, model_spec: dict[str, Any]) -> None:
    response = client.post("/models", json=model_spec)

    assert response.status_code == 201, response.text
    model = response.json()
    assert response.headers["location"] == f"/models/{model['id']}"
    assert model["num_classes"] == 10 and model["latest_version"] is None
    assert client.get(f"/models/{model['id']}").json() == model
    assert _actions(client, model["id"]) == ["model.created"]


def test_a_model_name_is_unique_per_tenant(client: TestClient, model_spec: dict[str, Any]) -> None:
    assert client.post("/models", json=model_spec).status_code == 201

    assert_problem(client.post("/models", json=model_spec), 409, "model_name_taken", model_spec["name"])


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        ({"mean": [0.1, 0.2]}, [], "mean has 2 values but input_shape has 1 channels"),
        ({"std": [0.0]}, [], "std values must be positive"),
        ({"input_shape": [1, 8]}, ["input_shape"], "at least 3 items"),
        ({"class_names": ["a", "a"]}, [], "class_names must be unique"),
        ({"class_names": [*"012345678", " \t"]}, ["class_names", 9], "only whitespace"),
        ({"num_classes": 7}, [], "num_classes is 7 but 10 class_names were given"),
        ({"name": None}, ["name"], "valid string"),
        ({"unknown": 1}, ["unknown"], "Extra inputs are not permitted"),
    ],
)
def test_a_malformed_model_is_422_with_each_error_listed(
    client: TestClient, model_spec: dict[str, Any], change: dict[str, Any], where: list[str], message: str
) -> None:
    problem = assert_problem(client.post("/models", json={**model_spec, **change}), 422, "validation_error", message)

    assert any(message in error["msg"] and error["loc"][1 : 1 + len(where)] == where for error in problem["errors"])


def test_an_unknown_architecture_is_422(client: TestClient, model_spec: dict[str, Any]) -> None:
    response = client.post("/models", json={**model_spec, "architecture": "vgg-nonsense"})

    assert_problem(response, 422, "invalid_architecture", "unknown architecture 'vgg-nonsense'")


def test_an_unknown_torchvision_classifier_is_422(client: TestClient, model_spec: dict[str, Any]) -> None:
    response = client.post("/models", json={**model_spec, "architecture": "torchvision:nonexistent"})

    assert_problem(response, 422, "invalid_architecture", "unknown torchvision classifier 'nonexistent'")


def test_an_architecture_that_cannot_take_the_input_shape_is_422(client: TestClient, model_spec: dict[str, Any]) -> None:
    spec = {**model_spec, "architecture": "torchvision:inception_v3"}  # pools an 8x8 image past 1x1

    response = client.post("/models", json=spec)

    assert_problem(response, 422, "invalid_architecture", f"cannot take inputs of shape {spec['input_shape']}")
    assert spec["name"] not in {m["name"] for m in client.get("/models").json()["models"]}


def test_an_architecture_without_batchnorm_statistics_is_422(client: TestClient, model_spec: dict[str, Any]) -> None:
    response = client.post("/models", json={**model_spec, "architecture": "torchvision:squeezenet1_0"})

    assert_problem(response, 422, "invalid_architecture", "no BatchNorm layer", "cannot unlearn this model")


def test_an_architecture_over_the_parameter_limit_is_422(tmp_path, model_spec: dict[str, Any]) -> None:  # noqa: ANN001
    with TestClient(create_app(Settings(home=tmp_path, max_checkpoint_parameters=1_000_000))) as client:
        authorize(client)
        response = client.post("/models", json={**model_spec, "architecture": "resnet18"})

        assert_problem(response, 422, "invalid_architecture", "at most 1,000,000 (UISPS_MAX_CHECKPOINT_PARAMETERS)")
        assert client.post("/models", json={**model_spec, "name": unique_name()}).status_code == 201  # smallcnn fits


def test_an_architecture_whose_checkpoints_are_over_the_upload_limit_is_422(tmp_path, model_spec: dict[str, Any]) -> None:  # noqa: ANN001
    # registered, it could never be given a version: every upload would be a 413
    with TestClient(create_app(Settings(home=tmp_path, max_upload_bytes=4 << 20))) as client:
        authorize(client)
        response = client.post("/models", json={**model_spec, "architecture": "resnet18"})  # 44 MB of fp32

        assert_problem(response, 422, "invalid_architecture", "so none can be uploaded", "(UISPS_MAX_UPLOAD_BYTES)")
        assert client.post("/models", json={**model_spec, "name": unique_name()}).status_code == 201  # smallcnn fits


def test_a_body_that_is_not_json_is_422(client: TestClient) -> None:
    response = client.post("/models", content=b"{not json", headers={"content-type": "application/json"})

    problem = assert_problem(response, 422, "validation_error", "JSON decode error")
    assert problem["errors"][0]["type"] == "json_invalid"


def test_an_unknown_model_is_404(client: TestClient) -> None:
    for path in ("/models/nope", "/models/nope/versions", "/models/nope/versions/1", "/models/nope/versions/1/checkpoint"):
        assert_problem(client.get(path), 404, "not_found", "model nope does not exist")
    assert_problem(_upload(client, "nope", b"x"), 404, "not_found", "model nope does not exist")


def test_uploads_become_versions_1_2_3(client: TestClient, registered_model, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    model = registered_model()
    second = _upload(client, model["id"], digits_checkpoint)

    assert second.status_code == 201
    assert second.headers["location"] == f"/models/{model['id']}/versions/2"
    version = second.json()
    assert version["version"] == 2 and version["forgotten_labels"] == [] and version["parent_version"] is None
    assert version["sha256"] == hashlib.sha256(digits_checkpoint).hexdigest()
    assert version["size_bytes"] == len(digits_checkpoint)
    listed = client.get(f"/models/{model['id']}/versions").json()
    assert [v["version"] for v in listed["versions"]] == [1, 2] and listed["next_page_token"] == ""
    assert client.get(f"/models/{model['id']}").json()["latest_version"] == 2
    assert _actions(client, model["id"]) == ["model.created", "model_version.created", "model_version.created"]


def test_a_missing_version_is_404(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()

    missing = client.get(f"/models/{model['id']}/versions/9")
    assert_problem(missing, 404, "not_found", f"model {model['id']}: version 9 does not exist")
    assert_problem(client.get(f"/models/{model['id']}/versions/9/checkpoint"), 404, "not_found")


def _tampered(checkpoint: bytes, change) -> bytes:  # noqa: ANN001
    model, manifest = load_checkpoint_bytes(checkpoint)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    change(state)
    return st_save(state, metadata={MANIFEST_KEY: manifest.model_dump_json()})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update({"head.weight": torch.zeros(5, 64)}), "tensor 'head.weight': shape [5, 64] != expected [10, 64]"),
        (lambda s: s.__setitem__("head.bias", s["head.bias"].double()), "tensor 'head.bias': dtype torch.float64"),
        (lambda s: s["head.bias"].__setitem__(0, float("nan")), "holds NaN or Inf"),
        (lambda s: s.pop("head.bias"), "missing ['head.bias']"),
    ],
)
def test_a_checkpoint_that_does_not_fit_the_architecture_is_422(
    client: TestClient, registered_model, digits_checkpoint: bytes, change, message: str  # noqa: ANN001
) -> None:
    model = registered_model(upload=False)

    response = _upload(client, model["id"], _tampered(digits_checkpoint, change))

    assert_problem(response, 422, "invalid_checkpoint", message)
    assert client.get(f"/models/{model['id']}/versions").json()["versions"] == []


def test_a_checkpoint_trained_for_another_input_or_classes_is_422(
    client: TestClient, model_spec: dict[str, Any], digits_checkpoint: bytes
) -> None:
    # Registered by hand with another normalisation and class order than the file was trained with.
    names = [str(9 - i) for i in range(10)]
    model = client.post("/models", json={**model_spec, "mean": [0.5], "std": [0.5], "class_names": names}).json()

    response = _upload(client, model["id"], digits_checkpoint)

    problem = assert_problem(response, 422, "invalid_checkpoint", "manifest disagrees with the model's registration")
    assert "mean [" in problem["detail"] and "(registered: [0.5])" in problem["detail"]
    assert "class_names" in problem["detail"]
    assert client.get(f"/models/{model['id']}/versions").json()["versions"] == []


def test_a_checkpoint_agrees_with_a_registration_by_class_count_and_rounded_statistics(
    client: TestClient, model_spec: dict[str, Any], digits_checkpoint: bytes
) -> None:
    model_state, manifest = load_checkpoint_bytes(digits_checkpoint)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    named = checkpoint_bytes(model_state, manifest.model_copy(update={"class_names": words}))
    spec = {k: v for k, v in model_spec.items() if k != "class_names"}
    spec |= {"num_classes": 10, "mean": [round(m, 4) for m in spec["mean"]], "std": [round(s, 4) for s in spec["std"]]}
    model = client.post("/models", json=spec).json()  # names "0".."9": none claimed

    assert _upload(client, model["id"], named).status_code == 201


def test_a_checkpoint_whose_labels_name_the_registered_classes_in_another_order_is_422(
    client: TestClient, registered_model, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model = registered_model(upload=False)  # the digits: class names "0".."9", label i is digit i
    model_state, manifest = load_checkpoint_bytes(digits_checkpoint)
    relabelled = manifest.model_copy(update={"class_names": [str(9 - i) for i in range(10)]})
    reversed_names = checkpoint_bytes(model_state, relabelled)

    response = _upload(client, model["id"], reversed_names)

    assert_problem(response, 422, "invalid_checkpoint", "class_names")
    assert client.get(f"/models/{model['id']}/versions").json()["versions"] == []


def test_a_checkpoint_without_a_manifest_is_taken_as_registered(client: TestClient, registered_model, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    model = registered_model(upload=False)
    plain, _ = load_checkpoint_bytes(digits_checkpoint)

    bare = st_save({k: v.contiguous() for k, v in plain.state_dict().items()})

    response = _upload(client, model["id"], bare)

    assert response.status_code == 201, response.text
    assert response.json()["sha256"] == hashlib.sha256(bare).hexdigest()  # stored as sent
    # the registration stands in for the missing manifest: the version can be unlearned from
    created = client.post("/deletion-requests", json={"model_id": model["id"], "forget_labels": [3]})
    assert created.status_code == 202, created.text


def test_a_file_that_is_not_safetensors_is_422(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model(upload=False)
    pickle_like = b"\x80\x04\x95" + b"\x00" * 64  # a pickle stream is never unpickled

    assert_problem(_upload(client, model["id"], pickle_like), 422, "invalid_checkpoint", "not a safetensors file")


def test_an_upload_without_a_file_is_422(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model(upload=False)

    problem = assert_problem(client.post(f"/models/{model['id']}/versions"), 422, "validation_error", "file")
    assert problem["errors"][0]["loc"] == ["body", "file"]


def test_an_upload_over_the_size_limit_is_413(tmp_path, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    # Registered under a limit its checkpoints fit; the operator lowered the limit since.
    with TestClient(create_app(Settings(home=tmp_path))) as client:
        authorize(client)
        model_id = client.post(
            "/models",
            json={"name": unique_name(), "architecture": "smallcnn", "num_classes": 10, "input_shape": [1, 8, 8],
                  "mean": [0.3], "std": [0.4], "data_source": "digits"},
        ).json()["id"]
    limit = len(digits_checkpoint) // 2
    with TestClient(create_app(Settings(home=tmp_path, max_upload_bytes=limit))) as client:
        authorize(client)

        # Within the multipart slack: the handler measures the file itself.
        assert_problem(_upload(client, model_id, digits_checkpoint), 413, "checkpoint_too_large", f"the limit is {limit}")
        # Far over: refused from Content-Length before the body is read.
        huge = digits_checkpoint * 3
        assert_problem(_upload(client, model_id, huge), 413, "content_too_large", "the checkpoint upload is")
        # No Content-Length (chunked): counted as it arrives.
        chunks = iter([b"x" * 65536] * 8)
        multipart = {"content-type": "multipart/form-data; boundary=b"}
        chunked = client.post(f"/models/{model_id}/versions", content=chunks, headers=multipart)
        assert_problem(chunked, 413, "content_too_large", "exceeds")
        assert client.get(f"/models/{model_id}/versions").json()["versions"] == []


def test_download_serves_the_file_with_its_sha256_and_is_audited(
    client: TestClient, registered_model, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model = registered_model()

    response = client.get(f"/models/{model['id']}/versions/1/checkpoint")

    assert response.status_code == 200
    assert response.content == digits_checkpoint
    sha = hashlib.sha256(digits_checkpoint).hexdigest()
    assert response.headers["x-checkpoint-sha256"] == sha
    b64 = base64.b64encode(bytes.fromhex(sha)).decode()
    assert response.headers["repr-digest"] == f"sha-256=:{b64}:"
    assert response.headers["digest"] == f"sha-256={b64}"
    assert response.headers["content-type"] == "application/octet-stream"
    assert ".safetensors" in response.headers["content-disposition"]
    events = client.get("/audit-events", params={"model_id": model["id"]}).json()["audit_events"]
    assert events[-1]["action"] == "model_version.downloaded"
    assert events[-1]["details"] == {"version": 1, "sha256": sha}


def test_a_range_resumes_a_download_and_a_refused_one_is_not_recorded(
    client: TestClient, registered_model, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model = registered_model()
    url, size = f"/models/{model['id']}/versions/1/checkpoint", len(digits_checkpoint)

    part = client.get(url, headers={"Range": "bytes=100-"})
    past = client.get(url, headers={"Range": f"bytes={size}-"})
    garbled = [client.get(url, headers={"Range": value}) for value in ("bytes=5-1", "garbage", "items=0-1")]

    assert part.status_code == 206 and part.content == digits_checkpoint[100:]
    assert_problem(past, 416, "range_not_satisfiable", f"{size} bytes")
    assert past.headers["content-range"] == f"bytes */{size}"
    for response in garbled:  # not a valid byte range: ignored, the whole file
        assert response.status_code == 200 and response.content == digits_checkpoint
    assert _actions(client, model["id"]).count("model_version.downloaded") == 4  # not the 416


def test_a_client_holding_the_checkpoint_gets_304_and_nothing_is_recorded(
    client: TestClient, registered_model, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model = registered_model()
    url = f"/models/{model['id']}/versions/1/checkpoint"
    first = client.get(url)
    etag = first.headers["etag"]
    recorded = _actions(client, model["id"]).count("model_version.downloaded")

    held = [client.get(url, headers={"If-None-Match": value})
            for value in (etag, f'"0000", W/{etag}', "*")]
    resumed = client.get(url, headers={"If-None-Match": etag, "Range": "bytes=100-"})
    head = client.head(url, headers={"If-None-Match": etag})
    other = client.get(url, headers={"If-None-Match": '"0000"'})
    # a list split over two field lines (RFC 9110 sec. 5.3)
    split = client.get(url, headers=[("If-None-Match", '"0000"'), ("If-None-Match", etag)])

    assert first.headers["cache-control"] == "private, no-cache"  # a cache asks again before each use
    for response in (*held, resumed, head, split):
        assert response.status_code == 304 and response.content == b""
        assert response.headers["etag"] == etag and response.headers["cache-control"] == "private, no-cache"
    assert other.status_code == 200 and other.content == digits_checkpoint
    assert _actions(client, model["id"]).count("model_version.downloaded") == recorded + 1  # `other` only


def test_a_download_on_condition_of_another_etag_is_412_and_nothing_is_recorded(
    client: TestClient, registered_model, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model = registered_model()
    url = f"/models/{model['id']}/versions/1/checkpoint"
    etag = client.head(url).headers["etag"]

    refused = [client.get(url, headers={"If-Match": '"0000"'}), client.get(url, headers={"If-Match": f"W/{etag}"}),
               client.get(url, headers={"If-Match": '"0000"', "If-None-Match": etag}),  # If-Match is evaluated first
               client.head(url, headers={"If-Match": '"0000"'})]
    served = [client.get(url, headers={"If-Match": value}) for value in (etag, f'"0000", {etag}', "*")]

    for response in refused[:3]:
        assert_problem(response, 412, "precondition_failed", etag)
    assert refused[3].status_code == 412
    assert all(response.status_code == 200 and response.content == digits_checkpoint for response in served)
    assert _actions(client, model["id"]).count("model_version.downloaded") == len(served)


def test_a_range_of_other_bytes_than_the_checkpoint_s_is_ignored_for_the_whole_file(
    client: TestClient, registered_model, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model = registered_model()
    url, size = f"/models/{model['id']}/versions/1/checkpoint", len(digits_checkpoint)
    head = client.head(url).headers
    etag = head["etag"]

    same = [client.get(url, headers={"Range": "bytes=100-", "If-Range": validator})
            for validator in (etag, head["last-modified"])]
    # the client's partial copy is of other bytes: its range means nothing here, not even a 416
    other = [client.get(url, headers={"Range": value, "If-Range": '"0000"'}) for value in ("bytes=100-", f"bytes={size}-")]
    weak = client.get(url, headers={"Range": "bytes=100-", "If-Range": f"W/{etag}"})

    for response in same:
        assert response.status_code == 206 and response.content == digits_checkpoint[100:]
    for response in (*other, weak):
        assert response.status_code == 200 and response.content == digits_checkpoint


def test_range_specs_are_clipped_to_the_file_and_suffixes_count_from_its_end(
    client: TestClient, registered_model, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model = registered_model()
    url, size = f"/models/{model['id']}/versions/1/checkpoint", len(digits_checkpoint)

    tail = client.get(url, headers={"Range": "bytes=-10"})
    clipped = client.get(url, headers={"Range": f"bytes=0-{10 * size}"})
    one_inside = client.get(url, headers={"Range": f"bytes=0-3, {size + 5}-"})

    assert tail.status_code == 206 and tail.content == digits_checkpoint[-10:]
    assert clipped.status_code == 206 and clipped.content == digits_checkpoint
    assert one_inside.status_code == 206 and one_inside.content == digits_checkpoint[:4]


def test_range_positions_of_thousands_of_digits_mean_what_they_say(
    client: TestClient, registered_model, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model = registered_model()
    url, huge = f"/models/{model['id']}/versions/1/checkpoint", "9" * 5000  # past Python's int() limit

    to_the_end = client.get(url, headers={"Range": f"bytes=100-{huge}"})
    whole_as_suffix = client.get(url, headers={"Range": f"bytes=-{huge}"})
    past = client.get(url, headers={"Range": f"bytes={huge}-"})
    leading_zeros = client.get(url, headers={"Range": "bytes=" + "0" * 5000 + "5-9"})

    assert to_the_end.status_code == 206 and to_the_end.content == digits_checkpoint[100:]
    assert whole_as_suffix.status_code == 206 and whole_as_suffix.content == digits_checkpoint
    assert_problem(past, 416, "range_not_satisfiable")
    assert leading_zeros.status_code == 206 and leading_zeros.content == digits_checkpoint[5:10]


def test_a_checkpoint_lost_from_storage_is_a_500_that_says_so(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    version = client.get(f"/models/{model['id']}/versions/1").json()
    client.app.state.store.delete(key_for(version["sha256"], "default"))

    response = client.get(f"/models/{model['id']}/versions/1/checkpoint")

    assert_problem(response, 500, "artifact_missing", "missing from artifact storage")
    assert _actions(client, model["id"])[-1] != "model_version.downloaded"


def test_a_checkpoint_whose_bytes_changed_is_never_served(
    client: TestClient, registered_model, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model = registered_model()
    version = client.get(f"/models/{model['id']}/versions/1").json()
    path = client.app.state.store.local_path(key_for(version["sha256"], "default"))
    path.write_bytes(digits_checkpoint[:-4] + b"\0\0\0\0")  # bit rot, or someone editing the store

    response = client.get(f"/models/{model['id']}/versions/1/checkpoint")

    assert_problem(response, 500, "artifact_corrupted", f"not its recorded {version['sha256']}")
    assert _actions(client, model["id"])[-1] != "model_version.downloaded"


def test_a_checkpoint_changed_after_a_download_is_caught_at_the_next(
    client: TestClient, registered_model, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    # A download does not hash a file again within a minute of hashing it, unless the file changed.
    model = registered_model()
    version = client.get(f"/models/{model['id']}/versions/1").json()
    assert client.get(f"/models/{model['id']}/versions/1/checkpoint").status_code == 200
    path = client.app.state.store.local_path(key_for(version["sha256"], "default"))
    path.write_bytes(digits_checkpoint[:-4] + b"\0\0\0\0")

    response = client.get(f"/models/{model['id']}/versions/1/checkpoint")

    assert_problem(response, 500, "artifact_corrupted", f"not its recorded {version['sha256']}")


@pytest.mark.parametrize("change", ["deleted", "replaced"])
@pytest.mark.parametrize("asked", [None, "bytes=10-99", "bytes=0-9,100-109"])
def test_a_download_serves_the_bytes_it_checked_when_the_file_changes_right_after(
    client: TestClient, registered_model, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
    change: str, asked: str | None,
) -> None:
    # A purge or a rekey deletes the file, a restore replaces it, between the check (and the
    # audit record) and the send: the download still sends the bytes that were hashed.
    from core.services.models.service import model_service

    model = registered_model()
    version = client.get(f"/models/{model['id']}/versions/1").json()
    path = client.app.state.store.local_path(key_for(version["sha256"], "default"))
    checked = model_service.checkpoint_for_download

    def then_changed(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        download = checked(*args, **kwargs)
        if change == "deleted":
            path.unlink()
        else:
            other = path.with_name("other")
            other.write_bytes(b"\0" * len(digits_checkpoint))
            other.replace(path)
        return download

    monkeypatch.setattr(model_service, "checkpoint_for_download", then_changed)

    response = client.get(f"/models/{model['id']}/versions/1/checkpoint",
                          headers={"Range": asked} if asked else {})

    if asked is None:
        assert response.status_code == 200 and response.content == digits_checkpoint
    elif "," not in asked:
        assert response.status_code == 206 and response.content == digits_checkpoint[10:100]
    else:
        assert response.status_code == 206
        assert digits_checkpoint[:10] in response.content and digits_checkpoint[100:110] in response.content
        assert b"\0" * 10 not in response.content


def test_models_are_listed_page_by_page(client: TestClient, registered_model) -> None:  # noqa: ANN001
    created = [registered_model(upload=False)["id"] for _ in range(3)]

    seen: list[str] = []
    token = ""
    while True:
        page = client.get("/models", params={"page_size": 2, "page_token": token}).json()
        assert len(page["models"]) <= 2
        seen += [m["id"] for m in page["models"]]
        token = page["next_page_token"]
        if not token:
            break
    assert len(seen) == len(set(seen))
    assert [i for i in seen if i in created] == created[::-1]  # newest first


def test_a_bad_page_token_is_400(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    registered_model()
    token = client.get("/models", params={"page_size": 1}).json()["next_page_token"]

    assert_problem(client.get("/models", params={"page_token": "garbage!"}), 400, "invalid_page_token")
    # A token is bound to the query it came from.
    response = client.get(f"/models/{model['id']}/versions", params={"page_token": token})
    assert_problem(response, 400, "invalid_page_token", "different query")
    # A token built by hand for the right query, with a position the service never wrote.
    forged = encode_token(["not a version"], {"resource": "model_versions", "tenant": "default", "model_id": model["id"]})
    response = client.get(f"/models/{model['id']}/versions", params={"page_token": forged})
    assert_problem(response, 400, "invalid_page_token", "not a token this service issued")


def test_a_page_size_of_0_is_the_default_and_one_above_the_maximum_is_lowered(
    client: TestClient, registered_model, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    for _ in range(DEFAULT_PAGE_SIZE + 1):
        registered_model(upload=False)

    unsized = client.get("/models").json()
    zero = client.get("/models", params={"page_size": 0}).json()
    assert len(unsized["models"]) == len(zero["models"]) == DEFAULT_PAGE_SIZE  # AIP-158: 0 is the default
    assert zero["next_page_token"]
    monkeypatch.setattr("api.deps.MAX_PAGE_SIZE", 3)  # a maximum this test can reach
    capped = client.get("/models", params={"page_size": 4}).json()
    assert len(capped["models"]) == 3 and capped["next_page_token"]
    assert_problem(client.get("/models", params={"page_size": -1}), 422, "validation_error", "page_size")


def test_a_data_source_whose_images_or_classes_the_model_cannot_take_is_422(
    client: TestClient, model_spec: dict[str, Any]
) -> None:
    classes = client.post("/models", json={**model_spec, "class_names": None, "num_classes": 5})
    shape = client.post("/models", json={**model_spec, "input_shape": [1, 28, 28]})

    assert_problem(classes, 422, "invalid_data", "'digits' holds 10 classes of 1x8x8", "for 5 classes of 1x8x8")
    assert_problem(shape, 422, "invalid_data", "for 10 classes of 1x28x28")
    assert client.post("/models", json=model_spec).status_code == 201  # its name was not taken


@pytest.mark.parametrize("source", ["npz:/etc/passwd", "imagefolder:/", "npz:{root}/../other-tenant.npz"])
def test_a_data_source_outside_the_data_roots_is_422(tmp_path, model_spec: dict[str, Any], source: str) -> None:  # noqa: ANN001
    root = tmp_path / "data"
    with TestClient(create_app(Settings(home=tmp_path, data_roots=str(root)))) as client:
        authorize(client)
        response = client.post("/models", json={**model_spec, "data_source": source.format(root=root)})

        assert_problem(response, 422, "invalid_data", "outside the folders this service reads data from")
        assert client.get("/models").json()["models"] == []


def test_a_data_path_the_file_system_refuses_is_no_server_error(tmp_path, model_spec: dict[str, Any]) -> None:  # noqa: ANN001
    # a name too long to look up: whether a file exists is for the worker that reads it to say
    root = tmp_path / "data"
    root.mkdir()
    with TestClient(create_app(Settings(home=tmp_path, data_roots=str(root)))) as client:
        authorize(client)
        response = client.post("/models", json={**model_spec, "data_source": f"npz:{root}/{'a' * 300}"})

        assert response.status_code == 201, response.text


def test_without_data_roots_only_builtin_data_is_accepted(client: TestClient, model_spec: dict[str, Any]) -> None:
    refused = client.post("/models", json={**model_spec, "data_source": "npz:/data/train.npz"})

    assert_problem(refused, 422, "invalid_data", "UISPS_DATA_ROOTS")
    assert client.post("/models", json=model_spec).status_code == 201  # model_spec's source is digits


def test_a_data_source_under_the_tenants_root_is_registered(tmp_path, model_spec: dict[str, Any]) -> None:  # noqa: ANN001
    roots = f"{tmp_path}/shared,{tmp_path}/tenants/{{tenant}}"
    with TestClient(create_app(Settings(home=tmp_path, data_roots=roots))) as client:
        authorize(client)
        own = client.post("/models", json={**model_spec, "data_source": f"npz:{tmp_path}/tenants/default/x.npz"})
        other = client.post("/models", json={**model_spec, "name": unique_name(),
                                             "data_source": f"npz:{tmp_path}/tenants/globex/x.npz"})

        assert own.status_code == 201, own.text
        assert_problem(other, 422, "invalid_data", "outside the folders")


def test_an_upload_while_the_artifact_store_is_down_is_a_503_to_retry(
    tmp_path, digits_checkpoint: bytes, model_spec: dict[str, Any], monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    # fake credentials and one try: the request is signed, then finds nobody on port 9
    for name, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    down = Settings(home=tmp_path, artifact_backend="s3", s3_bucket="models", s3_endpoint_url="http://127.0.0.1:9")
    with TestClient(create_app(down)) as client:
        authorize(client)
        model_id = client.post("/models", json=model_spec).json()["id"]

        response = _upload(client, model_id, digits_checkpoint)

        assert_problem(response, 503, "artifact_store_unavailable", "retry")
        assert response.headers["retry-after"].isdigit()
        assert client.get(f"/models/{model_id}/versions").json()["versions"] == []  # nothing half-recorded


def test_an_upload_onto_a_full_disk_is_a_503_to_retry_and_leaves_nothing_behind(
    client: TestClient, registered_model, unique_digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    model_id = registered_model(upload=False)["id"]
    root = client.app.state.store.root
    files_before = {p for p in root.rglob("*") if p.is_file()}

    def disk_fills_up(chunks, target):  # noqa: ANN001, ANN202
        target.write(next(iter(chunks)))  # some bytes reach the disk first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_module, "_copy_hashing", disk_fills_up)
    response = _upload(client, model_id, unique_digits_checkpoint)

    assert_problem(response, 503, "artifact_store_unavailable", "retry")
    assert response.headers["retry-after"].isdigit()
    assert client.get(f"/models/{model_id}/versions").json()["versions"] == []
    assert "model_version.created" not in _actions(client, model_id)
    assert {p for p in root.rglob("*") if p.is_file()} == files_before  # no temp file left


def test_the_documented_example_registers_a_model_that_takes_a_digits_checkpoint(
    client: TestClient, digits_checkpoint: bytes
) -> None:
    # what a newcomer copies from the OpenAPI page must accept what `uisps train --dataset digits` wrote
    from api.models.schemas import DIGITS_EXAMPLE

    model = client.post("/models", json={**DIGITS_EXAMPLE, "name": unique_name()})
    assert model.status_code == 201, model.text

    files = {"file": ("m.safetensors", digits_checkpoint, "application/octet-stream")}
    uploaded = client.post(f"/models/{model.json()['id']}/versions", files=files)

    assert uploaded.status_code == 201, uploaded.text
