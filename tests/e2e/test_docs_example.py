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
    for placeholder, value in (('"http://127.0.0.1:8000"', service.url), ('"<admin key>"', service.admin_key),
                               ('"<compliance key>"', service.compliance_key)):
        assert code.count(placeholder) == 1, f"the example no longer has {placeholder} once"
        code = code.replace(placeholder, repr(value))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits.safetensors").write_bytes(digits_checkpoint)

    exec(compile(code, str(SERVICE_MD), "exec"), {})

    _, manifest = load_checkpoint_bytes((tmp_path / "digits-without-7.safetensors").read_bytes())
    assert manifest.forgotten_labels == [7]
