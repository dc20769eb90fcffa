"""pytest-benchmark harness: one provider axis shared by every suite.

A provider is a backend name ("reference", "triton", "cpp") or "compiled" (torch.compile of the
reference). Suites ask ``provider_fn(op, provider)`` for a callable and skip providers that
cannot run here, so a new backend shows up as a new column without a new harness.

Run: ``make bench`` (or ``pytest benchmarks -p no:cacheprovider --benchmark-only``); results
are saved with the machine's description by ``--benchmark-json``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from icakd_fast import _backend

PROVIDERS = ("reference", "compiled", "cpp", "triton")


def provider_available(provider: str, op: str, device: str) -> str | None:
    """None if the provider can run ``op`` on ``device``, else the reason."""
    if provider in ("reference", "compiled"):
        return None
    reasons = _backend.not_supported_reasons(provider, op, device)
    if provider == "triton" and device == "cpu" and not reasons:
        reasons = ["the Triton interpreter is a correctness tool, not a benchmark target"]
    return "; ".join(reasons) or None


@functools.lru_cache(maxsize=None)
def compiled(fn):
    return torch.compile(fn, dynamic=False)


def provider_fn(fn, provider: str):
    """``fn(*args, backend=...)`` bound to a provider."""
    if provider == "compiled":
        return compiled(functools.partial(fn, backend="reference"))
    return functools.partial(fn, backend=provider)


@pytest.fixture(params=PROVIDERS)
def provider(request):
    return request.param


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    machine_info["threads"] = torch.get_num_threads()
