"""What a run reports: ``metrics.jsonl`` (exact floats), TensorBoard events, a progress bar
and a concise log line; and Weights & Biases when installed and asked for
(``pretrain.wandb_log``). Only rank 0 writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pretrain import wandb_log


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, start_step: int, max_steps: int,
                 log_every: int, cfg=None):
        """``cfg``: the run config, whose ``wandb`` block decides on W&B logging (every rank
        checks it, rank 0 logs); None: no W&B."""
        self.enabled = enabled
        self.log_every = max(1, int(log_every))
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = self.bar = self.wandb = None
        use_wandb = cfg is not None and wandb_log.wanted(cfg)
        if not enabled:
            return
        self._truncate_after(start_step)
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if use_wandb:
            self.wandb = wandb_log.WandbLog(cfg, run_dir, start_step)

    def _truncate_after(self, step: int) -> None:
        """Drops lines logged after the step a resumed run restarts from."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        from pretrain.data.shards import atomic_write_bytes

        atomic_write_bytes(self.path, ("".join(k + "\n" for k in kept)).encode())

    def log(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **values} if prefix == "train" else {
            "step": step, **{f"{prefix}/{k}": v for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key if "/" in key else f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(step, values, prefix)
        if prefix == "train":
            self.bar.n = step
            self.bar.set_postfix(loss=f"{values['loss']:.4f}",
                                 tok_s=f"{values.get('tokens_per_s', 0):,.0f}", refresh=False)
            self.bar.refresh()
            if step % self.log_every == 0:
                val = "".join(f"  {k} {v:.4f}" for k, v in values.items()
                              if k.startswith("val/") and k != "val/tokens")
                self.bar.write(f"step {step}: loss {values['loss']:.4f}  lr {values['lr']:.3g}  "
                               f"grad_norm {values.get('grad_norm', float('nan')):.3g}  "
                               f"{values.get('tokens_per_s', 0):,.0f} tokens/s{val}")
        else:
            self.bar.write(f"step {step}: " + "  ".join(
                f"{prefix}/{k} {v:.4f}" for k, v in values.items() if isinstance(v, float)))

    def text(self, step: int, tag: str, texts: list[str]) -> None:
        if self.enabled:
            self.writer.add_text(tag, "\n\n---\n\n".join(texts), step)
            if self.wandb is not None:
                self.wandb.text(step, tag, texts)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.bar.close()
            if self.wandb is not None:
                self.wandb.close()
                self.wandb = None
