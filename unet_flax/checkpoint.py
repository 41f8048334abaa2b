"""Checkpoints with orbax: the train state and RNG, the data iterator's position, and the config.

Saved asynchronously every `save_every` steps and at the end; the last `keep` are kept. Every
process calls save (orbax writes replicated arrays once); a step directory appears only once its
write is complete, so an interrupted save leaves the previous checkpoint as the latest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

# Fields that may not change on resume: they define the network, or which batches and noise
# the remaining steps see. Learning rate, steps, logging, dtype and the driver may change.
RESUME_FIXED_TRAIN_FIELDS = ("batch_size", "seed", "data", "class_conditional", "label_dropout", "hflip",
                             "noise_schedule", "timesteps", "prediction")
RESUME_FREE_MODEL_FIELDS = ("dtype", "attention_impl", "remat")


class Checkpoints:
    def __init__(self, workdir: str | Path, keep: int = 3):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)), force=True)

    def read_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The state (placed as `abstract_state`'s shardings say) and the data iterator's state."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def incompatible_fields(saved: dict, current: dict) -> list[str]:
    """Names of the fields whose change would make a resumed run a different run."""
    differing = [f"{name} ({saved.get(name)!r} -> {current.get(name)!r})"
                 for name in RESUME_FIXED_TRAIN_FIELDS if saved.get(name) != current.get(name)]
    saved_model, current_model = saved.get("model", {}), current["model"]
    differing += [f"model.{name} ({saved_model.get(name)!r} -> {value!r})"
                  for name, value in current_model.items()
                  if name not in RESUME_FREE_MODEL_FIELDS and _normalise(saved_model.get(name)) != _normalise(value)]
    return differing


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
