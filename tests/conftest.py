"""Shared test setup.

Without CUDA, the Triton kernels run on CPU tensors through the interpreter: TRITON_INTERPRET
must be set before triton is first imported, so it is set here, at collection time.
"""

import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_sessionstart(session):
    """``ICAKD_TEST_REQUIRE=triton,cpp`` (CI sets it): stop at once when a listed backend cannot
    run on this machine's test device. Tests of an unavailable backend skip themselves, so
    without this a broken install would pass by testing less."""
    wanted = [b.strip() for b in os.environ.get("ICAKD_TEST_REQUIRE", "").split(",") if b.strip()]
    if not wanted:
        return
    from icakd_fast import _backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    problems = []
    for name in wanted:
        if name not in _backend.BACKENDS:
            raise pytest.UsageError(f"ICAKD_TEST_REQUIRE: unknown backend {name!r} (one of {_backend.BACKENDS})")
        reasons = _backend.not_supported_reasons(name, device=device)
        if reasons:
            problems.append(f"{name} on {device}: " + "; ".join(reasons))
    if problems:
        raise pytest.UsageError("ICAKD_TEST_REQUIRE: backends that cannot run here:\n  " + "\n  ".join(problems))
