"""The compliance dashboard in headless Chromium, against the real service (uvicorn + a worker).

Needs Debian's chromium at /usr/bin/chromium (`apt-get install -y chromium`; `.ci/run` installs it)
and the `playwright` package (the `test` extra), which drives that browser: nothing is downloaded.
Screenshots go to $UISPS_SCREENSHOT_DIR when it is set (docs/dashboard*.png come from
`UISPS_SCREENSHOT_DIR=docs .venv/bin/python -m pytest tests/e2e/test_dashboard_e2e.py`), else to
the test's temporary folder.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import rfc8785

from core.certificates import key_id, load_private_key
from uisps.client import ServiceError, UispsClient
from uisps.demo import FAST_PARAMS, model_spec_of
from uisps.local import LocalService

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` to run the dashboard's browser tests",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")

JOB_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 120.0
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # see tests/e2e/conftest.py
# LIVE_PARAMS: an inversion long enough (about 6 s on a 2-core CPU) to span several of the
# dashboard's one-second refreshes; TINY_PARAMS: a job of about a second.
LIVE_PARAMS = FAST_PARAMS | {"inversion": {"iterations": 1500}}
TINY_PARAMS = {
    "inversion": {"iterations": 20, "n_per_class": 8}, "fisher_retain_size": 64, "steps": 5, "precision": "fp32"
}
VIEWPORT = {"width": 1280, "height": 900}


@dataclass
class Service:
    url: str
    home: Path
    reader_key: str
    admin: UispsClient
    compliance: UispsClient
    log: Path
    alive: Callable[[], bool]

    def register(self, checkpoint: bytes) -> dict[str, Any]:
        model = self.admin.create_model(model_spec_of(checkpoint, f"digits-{uuid.uuid4().hex[:6]}"))
        self.admin.upload_version(model["id"], checkpoint)
        return model

    def ask(self, model_id: str, labels: list[int], params: dict[str, Any], **extra: Any) -> dict[str, Any]:
        body = {"model_id": model_id, "forget_labels": labels, "params": params, **extra}
        response = self.compliance.http.post("/deletion-requests", json=body)
        assert response.status_code == 202, response.text
        return response.json()

    def forget(self, model_id: str, labels: list[int], params: dict[str, Any], **extra: Any) -> dict[str, Any]:
        request = self.ask(model_id, labels, params, **extra)
        try:
            done = self.compliance.wait_for(request["id"], timeout_s=JOB_TIMEOUT_S, interval_s=0.2, alive=self.alive)
        except ServiceError as exc:
            pytest.fail(f"{exc}\n{self.log_tail()}")
        assert done["state"] == "succeeded", f"{done['error']}\n{self.log_tail()}"
        return done

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`uisps serve` (API + a worker process) on embedded defaults, with keys of every role.

    Replaces conftest's `service` (each deployment, per test) in this module: the page reads the
    same JSON API on either, and one service shared by the module keeps the browser tests short.
    """
    folder = tmp_path_factory.mktemp("dashboard")
    log = folder / "server.log"
    with log.open("wb") as log_file, LocalService(folder / "home", env=SINGLE_THREAD_ENV, log=log_file) as local:
        with UispsClient(local.url) as anonymous:
            try:
                anonymous.wait_ready(READY_TIMEOUT_S, alive=local.alive)
            except Exception:
                pytest.fail(f"the service did not start:\n{log.read_text(errors='replace')[-5000:]}")
        reader_key = local.create_api_key("reader")
        with (
            UispsClient(local.url, api_key=local.create_api_key("admin")) as admin,
            UispsClient(local.url, api_key=local.create_api_key("compliance")) as compliance,
        ):
            yield Service(local.url, local.home, reader_key, admin, compliance, log, local.alive)


@dataclass
class History:
    """A model with three versions: v2 forgot 3 from v1, v3 forgot 5 (and 3, which v2 forgot) from v1 (a branch)."""

    model: dict[str, Any]
    first: dict[str, Any]
    branch: dict[str, Any]


@pytest.fixture(scope="module")
def history(service: Service, digits_checkpoint: bytes) -> History:
    model = service.register(digits_checkpoint)
    first = service.forget(model["id"], [3], FAST_PARAMS, external_ref="GDPR-2291")
    branch = service.forget(model["id"], [5], TINY_PARAMS, base_version=1, external_ref="GDPR-2304")
    return History(model, first, branch)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        # Playwright passes --no-sandbox by default, which Chromium needs when run as root.
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=VIEWPORT)
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    try:
        yield tab
    finally:
        context.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("UISPS_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(page: Any, path: Path, max_height: int | None = None) -> None:
    """The page down to the end of its content (at most `max_height` pixels), not the empty rest."""
    bottom = page.evaluate("Math.ceil(document.querySelector('main').getBoundingClientRect().bottom + window.scrollY)")
    height = min(bottom, max_height or bottom)
    page.screenshot(path=str(path), full_page=True, clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height})


def sign_in(page: Any, service: Service, key: str | None = None) -> None:
    page.goto(f"{service.url}/dashboard/")
    page.fill("#key-input", key or service.reader_key)
    page.click("#key-form button[type=submit]")


def test_the_request_list_follows_a_running_jobs_progress(
    service: Service, history: History, digits_checkpoint: bytes, page: Any, screenshots: Path
) -> None:
    model = service.register(digits_checkpoint)  # `history`'s requests are listed too (the screenshot)
    request = service.ask(model["id"], [7], LIVE_PARAMS, external_ref="DSR-0417")
    sign_in(page, service)
    row = f'tr[data-request-id="{request["id"]}"]'

    seen: list[tuple[str, str, str]] = []  # (state, percent, stage) as the page shows them
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        shown = page.evaluate(
            """(row) => { const r = document.querySelector(row); if (!r) return null;
                 const stage = r.querySelector('.progress-stage');
                 return [r.querySelector('.badge').dataset.state, r.querySelector('.progress-text').textContent,
                         stage ? stage.textContent : '']; }""",
            row,
        )
        if shown and (not seen or tuple(shown) != seen[-1]):
            seen.append(tuple(shown))
            if len({percent for state, percent, _ in seen if state == "running"}) == 2:
                screenshot(page, screenshots / "dashboard-requests.png")
        if shown and shown[0] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)

    running = [(percent, stage) for state, percent, stage in seen if state == "running"]
    assert seen and seen[-1][:2] == ("succeeded", "100 %"), seen
    assert len({percent for percent, _ in running}) >= 2, f"the page never showed the progress move: {seen}"
    percents = [int(percent.rstrip(" %")) for percent, _ in running]
    assert percents == sorted(percents), seen
    assert {stage for _, stage in running} - {"", "running"}, seen  # it names the stage it is in


def test_a_finished_requests_page_shows_metrics_histogram_and_a_verified_certificate(
    service: Service, history: History, page: Any, screenshots: Path
) -> None:
    request = history.first
    sign_in(page, service)
    page.wait_for_selector("#requests")
    page.click(f'tr[data-request-id="{request["id"]}"] a[href^="#/requests/"]')
    verdict = page.wait_for_selector("#certificate-verdict")

    assert verdict.get_attribute("data-verdict") == "valid", verdict.text_content()
    after = request["metrics"]["after"]
    assert page.text_content("#metric-acc-forget .kpi-after") == f"{after['acc_forget']:.1f} %"
    assert page.text_content("#metric-acc-retain .kpi-after") == f"{after['acc_retain']:.1f} %"
    assert page.text_content("#metric-mia .kpi-after") == f"{after['mia']:.1f} %"
    bars = page.eval_on_selector_all("#histogram rect.bar-after", "bars => bars.map(b => Number(b.dataset.count))")
    assert bars == after["forget_histogram"]
    stages = page.eval_on_selector_all("#stages [data-stage]", "rows => rows.map(r => r.dataset.stage)")
    assert set(stages) == set(request["metrics"]["timings"])
    version = service.admin.get_version(history.model["id"], 2)
    assert version["sha256"] in page.text_content("#certificate")
    screenshot(page, screenshots / "dashboard.png")


@pytest.mark.parametrize(
    "tamper_with",
    [
        lambda certificate: certificate["labels"].update(forgotten=[4]),  # claim another class was forgotten
        lambda certificate: certificate.update(format=1),  # have it checked in the other canonical form
        lambda certificate: certificate.update(format=3),  # a form the page does not know
    ],
    ids=["labels", "format", "unknown-format"],
)
def test_a_certificate_changed_on_its_way_is_shown_as_invalid(
    service: Service, history: History, page: Any, tamper_with: Any
) -> None:
    def tamper(route: Any) -> None:
        document = route.fetch().json()
        tamper_with(document["certificate"])
        route.fulfill(body=json.dumps(document), content_type="application/json")

    page.route("**/certificate", tamper)
    sign_in(page, service)
    page.wait_for_selector("#requests")
    page.goto(f"{service.url}/dashboard/#/requests/{history.first['id']}")
    verdict = page.wait_for_selector("#certificate-verdict")

    assert verdict.get_attribute("data-verdict") == "invalid", verdict.text_content()


@pytest.mark.parametrize("format_", [2, 1])
def test_the_certificate_check_agrees_with_the_service_on_awkward_json(
    service: Service, history: History, page: Any, format_: int
) -> None:
    """Numbers Python and JavaScript write differently, non-ASCII and control characters, key order
    (UTF-16 order for RFC 8785: U+1F600 before U+FF01), in either format; format 1 (Python's form,
    issued before) also holds an integer beyond what a double holds."""
    biggest = 2**53 - 1 if format_ == 2 else 2**53 + 1

    def resign(route: Any) -> None:
        certificate = route.fetch().json()["certificate"]
        certificate["format"] = format_
        certificate["external_ref"] = 'Löschung „Art. 17" 😀 \u2028 \t\x01\x7f \\ /'
        certificate["awkward"] = {
            "B": 1e-05, "a": 1e16, "_": -0.0, "é": 100.0, "Z": 5e-324, "aa": [0.1, biggest, 1e21, 4.35],
            "😀": 1, "\uff01": 2,
        }
        key = load_private_key(service.home / "certificate-key.pem")
        # Signed here, not by core.certificates: the page must agree with RFC 8785 itself.
        signed = rfc8785.dumps(certificate) if format_ == 2 else json.dumps(
            certificate, sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode()
        signature = {"algorithm": "Ed25519", "key_id": key_id(key.public_key()),
                     "value": base64.b64encode(key.sign(signed)).decode()}
        document = {"certificate": certificate, "signature": signature}
        # as the API sends JSON (Starlette's JSONResponse): UTF-8, not ASCII-escaped
        body = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
        route.fulfill(body=body, content_type="application/json")

    page.route("**/certificate", resign)
    sign_in(page, service)
    page.wait_for_selector("#requests")
    page.goto(f"{service.url}/dashboard/#/requests/{history.first['id']}")
    verdict = page.wait_for_selector("#certificate-verdict")

    assert verdict.get_attribute("data-verdict") == "valid", verdict.text_content()


def test_the_lineage_view_shows_every_version_with_its_parent_labels_hash_request_and_checkpoint(
    service: Service, history: History, page: Any, screenshots: Path
) -> None:
    model_id = history.model["id"]
    purge = service.compliance.http.delete(f"/models/{model_id}/versions/1/checkpoint")  # both requests ended
    assert purge.status_code == 204, purge.text
    sign_in(page, service)
    page.wait_for_selector("#requests")
    page.click("#nav a[data-section=models]")
    page.click(f'tr[data-model-id="{model_id}"] a')
    page.wait_for_selector("#versions tbody tr[data-version]")

    rows = page.eval_on_selector_all(
        "#versions tbody tr",
        """rows => rows.map(r => ({version: r.dataset.version, cells: Array.from(r.cells, c => c.textContent),
                                   chips: Array.from(r.cells[2].querySelectorAll('.chip'), c => c.textContent),
                                   fresh: Array.from(r.cells[2].querySelectorAll('.chip-new'), c => c.textContent),
                                   request: (r.querySelector('a[href^="#/requests/"]') || {}).hash || null}))""",
    )
    versions = {v["version"]: v for v in service.admin.http.get(f"/models/{model_id}/versions").json()["versions"]}
    assert [row["version"] for row in rows] == ["1", "2", "3"]
    parents = [row["cells"][1] for row in rows]
    assert parents == ["upload", "v1", "v1"]  # v3 branched from v1
    assert rows[0]["cells"][2] == "none"
    # v3, asked to forget 5 from v1, forgot 3 too (version 2 had): both new against its parent
    assert [(row["chips"], row["fresh"]) for row in rows[1:]] == [(["3"], ["3"]), (["3", "5"], ["3", "5"])]
    assert [row["cells"][7].split(" ")[0] for row in rows] == ["purged", "kept", "kept"]
    for row in rows:
        version = versions[int(row["version"])]
        assert row["cells"][3] == version["sha256"]
        produced_by = version["deletion_request_id"]
        assert row["request"] == (f"#/requests/{produced_by}" if produced_by else None)
    assert page.eval_on_selector_all(".lineage-graph path.edge", "edges => edges.length") == 2
    screenshot(page, screenshots / "dashboard-lineage.png")


def test_the_audit_view_shows_the_hash_chain_linked(
    service: Service, history: History, page: Any, screenshots: Path
) -> None:
    sign_in(page, service)
    page.wait_for_selector("#requests")
    page.click("#nav a[data-section=audit]")
    page.wait_for_selector("#chain-summary.ok")

    shown = page.eval_on_selector_all(
        "#audit tbody tr", "rows => rows.map(r => [Number(r.dataset.eventId), r.dataset.action])"
    )
    events = service.admin.http.get("/audit-events", params={"page_size": 1000}).json()["audit_events"]
    assert shown == [[e["id"], e["action"]] for e in events]
    links = page.eval_on_selector_all("#audit [data-linked]", "cells => cells.map(c => c.dataset.linked)")
    assert links == ["true"] * len(events)
    succeeded = {e["subject_id"] for e in events if e["action"] == "deletion_request.succeeded"}
    assert {history.first["id"], history.branch["id"]} <= succeeded
    screenshot(page, screenshots / "dashboard-audit.png", max_height=VIEWPORT["height"])


def test_the_dashboard_only_reads_with_the_key_and_breaks_no_policy(
    service: Service, history: History, page: Any
) -> None:
    sent: list[Any] = []
    problems: list[str] = []
    page.on("request", lambda request: sent.append(request))
    page.on("console", lambda message: problems.append(message.text) if message.type in ("error", "warning") else None)
    page.on("pageerror", lambda error: problems.append(str(error)))

    sign_in(page, service)
    page.wait_for_selector("#requests tbody tr[data-request-id]")
    for hash_, ready in (
        (f"#/requests/{history.first['id']}", "#certificate-verdict"),
        (f"#/models/{history.model['id']}", "#versions tbody tr"),
        ("#/audit", "#chain-summary.ok"),
    ):
        page.goto(f"{service.url}/dashboard/{hash_}")
        page.wait_for_selector(ready)

    assert sent and {request.method for request in sent} == {"GET"}
    api_calls = [request for request in sent if "/dashboard/" not in request.url]
    assert api_calls
    for request in api_calls:
        headers = request.all_headers()
        if not request.url.endswith("/certificate-key"):  # the public key is open
            assert headers.get("authorization") == f"Bearer {service.reader_key}", request.url
        assert "cookie" not in headers
    assert not problems, problems  # a CSP refusal or a script error shows up here


def test_a_refused_key_is_not_kept(service: Service, page: Any) -> None:
    sign_in(page, service, key="uisps_" + "x" * 43)

    page.wait_for_selector("#key-error:not(:empty)")
    assert "refused" in page.text_content("#key-error")
    assert page.evaluate("sessionStorage.length") == 0
    assert page.is_visible("#sign-in") and not page.is_visible("#nav")
