"""MLLM adapters from `img jobs finetune-mllm`: identity, attaching one to a profile, loading, merging.

    from img.finetune.adapter import adapter_id, with_mllm_adapter
    adapter_id("runs/ft/adapter")                    # 'sha256:3f2a…' of its config and weight files
    p = with_mllm_adapter(get_profile("tiny"), "runs/ft/adapter")
    p.model_ids()["mllm_adapter"]                    # the id: part of every embed fingerprint
    GuidanceEncoder(p)                               # loads the MLLM with the adapter merged in

An adapter folder is peft's ``save_pretrained`` output (``adapter_config.json`` +
``adapter_model.safetensors``) plus our ``img_adapter.json`` (profile, base MLLM,
hidden width, run id, step). ``img.models.loading.load_mllm`` merges the adapter into
the base weights on load (``merge_and_unload``), so guidance extraction runs the
plain transformers model the embed job always runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from img.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from img.models.profiles import Profile


CONFIG_NAME = "adapter_config.json"  # peft's file names
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
META_NAME = "img_adapter.json"


def adapter_files(path: str | Path) -> list[Path]:
    """The files that define an adapter: peft's config and weights (not README.md, not our metadata)."""
    folder = Path(path)
    return [folder / n for n in (CONFIG_NAME, *WEIGHT_NAMES) if (folder / n).is_file()]


def check_adapter_dir(path: str | Path) -> Path:
    """``path`` as an absolute Path if it is a peft adapter folder; ``UserError`` naming it otherwise."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"`mllm_adapter` {str(path)!r} is not a folder. Pass RUN_DIR/adapter of "
                        "`img jobs finetune-mllm`.")
    files = adapter_files(folder)
    if not (folder / CONFIG_NAME).is_file() or len(files) < 2:
        raise UserError(f"`mllm_adapter` {str(path)!r} is not a peft adapter folder (needs {CONFIG_NAME} and "
                        f"{WEIGHT_NAMES[0]}). Pass RUN_DIR/adapter of `img jobs finetune-mllm`.")
    return folder.absolute()


def adapter_id(path: str | Path) -> str:
    """``sha256:<16 hex>`` over the names and bytes of the adapter's config and weight files."""
    h = hashlib.sha256()
    for f in adapter_files(check_adapter_dir(path)):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return f"sha256:{h.hexdigest()[:16]}"


def read_meta(path: str | Path) -> dict[str, Any]:
    """Our ``img_adapter.json`` (empty if the folder was made elsewhere)."""
    f = Path(path) / META_NAME
    return json.loads(f.read_text()) if f.is_file() else {}


def with_mllm_adapter(profile: "Profile", path: str | Path | None) -> "Profile":
    """``profile`` with its MLLM adapter set to ``path`` (None: unchanged); checks the adapter fits the MLLM."""
    if path is None:
        return profile
    folder = check_adapter_dir(path)
    meta = read_meta(folder)
    hidden = meta.get("mllm_hidden")
    if hidden is not None and int(hidden) != profile.dims.mllm_hidden:
        raise UserError(
            f"`mllm_adapter` {str(path)!r} was trained on an MLLM of width {hidden} (profile {meta.get('profile')!r}), "
            f"but profile {profile.name!r} has mllm_hidden {profile.dims.mllm_hidden}. Pass `profile` "
            f"{meta.get('profile')} or an adapter trained for {profile.name!r}."
        )
    return dataclasses.replace(profile, mllm_adapter=str(folder), mllm_adapter_id=adapter_id(folder))


def merge_adapter(model: Any, path: str | Path, expected_id: str = "") -> Any:
    """``model`` (a transformers MLLM) with the peft adapter at ``path`` merged into its weights.

    ``expected_id``: the id recorded when the profile was built; a changed folder is refused.
    """
    from peft import PeftModel

    folder = check_adapter_dir(path)
    if expected_id and adapter_id(folder) != expected_id:
        raise UserError(f"the MLLM adapter {str(folder)!r} changed since this job started (id {expected_id} -> "
                        f"{adapter_id(folder)}). Re-run the job.")
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"the MLLM adapter {str(folder)!r} does not fit the profile's MLLM ({str(e).splitlines()[0]}). "
                        "Pass an adapter trained for this profile.") from None
    return peft_model.merge_and_unload()
