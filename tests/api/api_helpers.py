"""Helpers shared by the API tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Torch in tests and their worker processes uses one thread: on a small shared CI machine two
# threads per process oversubscribe the cores, and OpenMP's spinning then costs 10x.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextmanager
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def unique_name(prefix: str = "digits") -> str:
    # The PostgreSQL database is shared by the whole run: names must not collide across tests.
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def assert_problem(response: Any, status: int, code: str, *fragments: str) -> dict[str, Any]:
    """An RFC 9457 problem with every required member, whose detail says what is wrong."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert {"type", "title", "status", "detail", "instance"} <= problem.keys()
    assert problem["status"] == status
    assert problem["code"] == code
    assert problem["type"].endswith(code)
    assert problem["instance"] == response.request.url.path
    for fragment in fragments:
        assert fragment in problem["detail"], problem["detail"]
    return problem
