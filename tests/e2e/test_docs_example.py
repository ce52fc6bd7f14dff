"""docs/service.md's "Your first deletion request" block, run as it stands against a real service."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.checkpoint import load_checkpoint_bytes

SERVICE_MD = Path(__file__).parents[2] / "docs" / "service.md"


def _first_request_block() -> str:
    section = SERVICE_MD.read_text().split("### Your first deletion request", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("service", ["embedded"], indirect=True)
def test_the_first_deletion_request_example_runs_as_written(
    service, digits_checkpoint: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    code = _first_request_block()
    # only what the reader fills in is replaced: the server's address and the two keys
    code = code.replace('"http://127.0.0.1:8000"', repr(service.url))
    code = code.replace('"<admin key>"', repr(service.admin_key)).replace('"<compliance key>"', repr(service.compliance_key))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits.safetensors").write_bytes(digits_checkpoint)

    exec(compile(code, str(SERVICE_MD), "exec"), {})

    _, manifest = load_checkpoint_bytes((tmp_path / "digits-without-7.safetensors").read_bytes())
    assert manifest.forgotten_labels == [7]
