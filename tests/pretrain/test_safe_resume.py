"""A resume never runs code from a tampered run checkpoint (2 CPU ranks, ZeRO-2): a rank
file replaced by a crafted one stops the run with one sentence naming the refused global
and the flag; DeepSpeed's own reader refuses a crafted optimizer state file."""

from pathlib import Path

import pytest

from model.checkpoint import safe
from model.errors import UntrustedCheckpointError
from pretrain import checkpointing
from tests.model.test_safe_load import PAYLOAD, add_payload
from tests.pretrain.test_train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def test_tampered_checkpoint_is_refused_on_resume(tmp_path, data_dir):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    common = ["trainer.deepspeed_config=zero2", "checkpointing.every_n_steps=2"]
    train(tmp_path, data_dir, *common, "trainer.max_steps=2")
    tag = Path(tmp_path, "checkpoints", "step_0000002")
    marker = tmp_path / "marker"

    # DeepSpeed's reader, as the engine calls it on resume: its real files pass the
    # allowlist, a crafted one is refused
    states = sorted(tag.glob("*_states.pt"))
    with safe.restricted_torch_load(safe.OURS, flag="checkpointing.trust=True"):
        assert all(TorchCheckpointEngine().load(str(f), map_location="cpu") for f in states)
        optim = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        original = optim.read_bytes()
        add_payload(optim, marker, "beside")
        with pytest.raises(UntrustedCheckpointError, match="checkpointing.trust=True"):
            TorchCheckpointEngine().load(str(optim), map_location="cpu")
    optim.write_bytes(original)

    add_payload(tag / "rank_00001.pt", marker, "beside")
    reseal(tag)  # whoever crafted the file can rewrite the manifest too
    done = train(tmp_path, data_dir, *common, "trainer.max_steps=4", check=False)
    assert done.returncode != 0
    # the rank's one line (another rank's progress bar may share the terminal line)
    refusal = [line.partition("mdlm: ")[2] for line in done.stderr.splitlines()
               if f"rank_00001.pt names {PAYLOAD}" in line]
    assert refusal, done.stderr[-3000:]
    assert refusal[0].endswith("load it fully with checkpointing.trust=True.")
    assert not marker.exists()
    assert Path(tmp_path, "checkpoints", "latest").read_text() == "step_0000002"


def reseal(tag_dir: Path) -> None:
    """The tag's manifest rewritten to its files as they are now."""
    import json

    path = tag_dir / checkpointing.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["files"] = checkpointing.file_sizes(tag_dir)
    path.write_text(json.dumps(manifest))
