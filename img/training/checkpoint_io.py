"""Read DeepSpeed checkpoints with ``torch.load(weights_only=True)``.

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    use_weights_only_loading(engine)           # before engine.load_checkpoint(...)
    engine.load_checkpoint(run_dir / "checkpoints", tag=tag)

    state = weights_only_load("…/zero_pp_rank_0_mp_rank_00_optim_states.pt")  # one file, by hand

DeepSpeed's ``TorchCheckpointEngine.load`` unpickles with ``weights_only=False``, i.e.
runs whatever a checkpoint file names. Every file that ``engine.load_checkpoint``
reads goes through ``engine.checkpoint_engine.load``, so swapping in
:class:`WeightsOnlyCheckpointEngine` makes resume pickle-safe while keeping
DeepSpeed's format and its own restore logic (ZeRO 0/1/2, fp32 and bf16).
Saving is unchanged.

Besides tensors, containers and ``torch.Size``, DeepSpeed 0.19's files hold
exactly three other globals, all in the ZeRO optimizer file
(``zero_pp_rank_*_optim_states.pt``); they are the only ones allowed here:

    deepspeed.runtime.zero.config.ZeroStageEnum        optimizer_state_dict.zero_stage (an IntEnum)
    deepspeed.runtime.fp16.loss_scaler.LossScaler      optimizer_state_dict.loss_scaler (cur_scale, dynamic)
    deepspeed.utils.tensor_fragment.fragment_address   optimizer_state_dict.param_slice_mappings (numel, start)

(listed with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0/1/2
checkpoints in fp32 and bf16 written by `img jobs train`). A file naming anything
else is refused with a :class:`~img.errors.UserError`.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from img.errors import UserError

log = logging.getLogger(__name__)

SAFE_GLOBALS: tuple[type, ...] = (ZeroStageEnum, LossScaler, fragment_address)


def weights_only_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` allowing only :data:`SAFE_GLOBALS` besides torch's defaults."""
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            extra = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - only used to word the message
            extra = []
        allowed = {f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS}
        names = [g for g in extra if g not in allowed] or ["(see the unpickler's message)"]
        raise UserError(
            f"checkpoint file {str(path)!r} holds {', '.join(names)}, which img does not unpickle "
            f"(only tensors and {', '.join(sorted(allowed))}). It was not written by `img jobs train` with "
            f"this DeepSpeed version; start a new `run_dir` instead of `resume`. ({str(e).splitlines()[0]})"
        ) from e


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine (same files on save) whose ``load`` uses :func:`weights_only_load`."""

    def load(self, path: str, map_location: Any = None) -> Any:
        log.debug("weights-only load of %s", path)
        return weights_only_load(path, map_location=map_location)


def use_weights_only_loading(engine: Any) -> None:
    """Make every checkpoint read of a ``DeepSpeedEngine`` go through :class:`WeightsOnlyCheckpointEngine`.

    Only DeepSpeed's default engine is replaced; a DeepSpeed JSON that picks another
    (``checkpoint.writer``, ``datastates``) or universal checkpoints (which DeepSpeed
    reads with its own ``torch.load(weights_only=False)``) is refused.
    """
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine and not isinstance(current, WeightsOnlyCheckpointEngine):
        raise UserError(
            f"the DeepSpeed config selects the checkpoint engine {type(current).__name__}; img reads checkpoints "
            "only through the default torch engine with weights_only=True. Remove 'checkpoint.writer' / "
            "'datastates' from the deepspeed_config JSON."
        )
    if engine.load_universal_checkpoint():
        raise UserError("the DeepSpeed config sets checkpoint.load_universal, whose loader unpickles with "
                        "weights_only=False. Remove 'load_universal' from the deepspeed_config JSON.")
    safe = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    safe.__dict__.update(current.__dict__)  # same settings (zipfile serialization) without re-reading the config
    engine.checkpoint_engine = safe
