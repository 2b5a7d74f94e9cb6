"""Weights & Biases logging, when ``wandb`` is installed and asked for.

TensorBoard and ``metrics.jsonl`` stay the default and are always written. W&B joins them
(rank 0 only, the same scalars under the same names, the validation samples as a table)
when ``wandb`` is importable and ``wandb.enabled`` says so:

- ``auto`` (the default): on when the command line sets any ``wandb.*`` key (the MDLM
  release's ``wandb.project=...``, ``wandb.name=...``, ``+wandb.offline=true`` ...);
  otherwise off, so an installed ``wandb`` (or a ``WANDB_MODE`` a cluster exports for
  everyone) never starts logging for someone who did not ask for it;
- ``true``: on (an error if ``wandb`` is not installed); ``false``: off.
``WANDB_MODE=disabled`` turns it off whatever the setting.

The release's keys map onto ``wandb.init``: ``project``, ``name``, ``group``, ``tags``,
``notes``, ``job_type``, ``id``, and ``+wandb.offline=true`` (``mode="offline"``; so does
``WANDB_MODE=offline``). The run's id (``wandb.id``, or one generated at the first start)
is kept in ``<run dir>/wandb_id``, and a run resumed after a requeue continues the same W&B
run (``resume="allow"``); a run that starts from step 0 gets a new id. W&B's files go to
``WANDB_DIR`` or else the run directory.
"""

from __future__ import annotations

import importlib.util
import math
import os
import secrets
import string
from pathlib import Path

from model.errors import ConfigError

ID_FILE = "wandb_id"
MAX_TAG = 64  # W&B refuses longer tags


def installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def _command_line_keys() -> list[str]:
    """The ``wandb.*`` keys set on this run's command line (through Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return []
        overrides = HydraConfig.get().overrides.task
    except (ImportError, ValueError):
        return []
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    return [k for k in keys if k.startswith("wandb.") and k != "wandb.enabled"]


def wanted(cfg) -> bool:
    """Whether this run logs to W&B (see the module's docstring); raises ConfigError for
    ``wandb.enabled=true`` without ``wandb`` installed or a value that is not a switch."""
    block = cfg.get("wandb") or {}
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    setting = block.get("enabled", "auto")
    setting = str(setting).lower() if setting is not None else "auto"
    if setting in ("false", "off", "0") or mode == "disabled":
        return False
    if setting in ("true", "on", "1"):
        if not installed():
            raise ConfigError("wandb.enabled=true needs the wandb package: pip install "
                              "'mdlm-pretrain[wandb]' (or wandb), or set wandb.enabled=auto.")
        return True
    if setting != "auto":
        raise ConfigError(f"wandb.enabled={setting!r} is not a switch; use auto, true or false.")
    return bool(_command_line_keys()) and installed()


def run_id(block, run_dir: Path, resumed: bool = True) -> str:
    """The configured ``wandb.id``, else the one saved by an earlier start of this run when
    it ``resumed``, else a new one; saved (atomically) in the run directory either way."""
    from pretrain.data.shards import atomic_write_bytes

    path = Path(run_dir) / ID_FILE
    saved = path.read_text().strip() if path.is_file() and resumed else ""
    chosen = str(block.get("id") or "") or saved or "".join(
        secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if chosen != saved:
        atomic_write_bytes(path, (chosen + "\n").encode())
    return chosen


class WandbLog:
    """One W&B run: ``log`` takes the values ``MetricsLog`` writes, ``text`` the samples."""

    def __init__(self, cfg, run_dir: Path, start_step: int):
        import wandb
        from omegaconf import OmegaConf

        block = cfg.get("wandb") or {}
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tags = [str(t)[-MAX_TAG:] for t in (block.get("tags") or []) if t is not None]
        mode = "offline" if block.get("offline") else None
        self.wandb = wandb
        settings = dict(
            project=block.get("project"), name=block.get("name"), group=block.get("group"),
            job_type=block.get("job_type"), notes=block.get("notes"), tags=tags,
            id=run_id(block, run_dir, resumed=int(start_step) > 0), resume="allow",
            mode=mode,
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True))
        try:
            self.run = wandb.init(**settings)
        except wandb.errors.Error as err:  # not logged in, no network, a refused id
            detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise ConfigError(
                f"could not start the Weights & Biases run ({type(err).__name__}: {detail}); "
                "log in (wandb login), log offline (+wandb.offline=true or "
                "WANDB_MODE=offline), or turn it off (wandb.enabled=false).") from err
        # Steps already in a resumed W&B run (logged after the checkpoint a requeued run
        # restarts from) are not written again: W&B keeps a run's steps increasing.
        self.first_step = max(int(self.run.step or 0), int(start_step) + 1)

    def log(self, step: int, values: dict, prefix: str) -> None:
        if step < self.first_step:
            return
        scalars = {key if "/" in key else f"{prefix}/{key}": value
                   for key, value in values.items()
                   if isinstance(value, (int, float)) and math.isfinite(value)}
        if scalars:
            self.run.log(scalars, step=step)

    def text(self, step: int, tag: str, texts: list[str]) -> None:
        if step >= self.first_step:
            table = self.wandb.Table(columns=["text"], data=[[t] for t in texts])
            self.run.log({tag: table}, step=step)

    def close(self) -> None:
        self.run.finish()
