"""A test guard: every ``torch.load`` must pass ``weights_only=True`` (used by the resume tests)."""
from __future__ import annotations

from pathlib import Path

import torch


def only_weights_only_torch_load(monkeypatch) -> list[str]:
    """Make torch.load raise unless called with weights_only=True; returns the files it loaded."""
    real, loaded = torch.load, []

    def guarded(f, *args, **kwargs):
        if kwargs.get("weights_only") is not True:
            raise AssertionError(f"torch.load({f!r}) with weights_only={kwargs.get('weights_only')!r}")
        loaded.append(Path(f).name)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)
    monkeypatch.setattr(torch.serialization, "load", guarded)
    return loaded
