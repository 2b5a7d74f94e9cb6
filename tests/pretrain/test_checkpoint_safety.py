"""A damaged checkpoint never blocks a resume, and a failed save leaves the last checkpoint
intact (``pretrain.checkpointing``)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pretrain import checkpointing as C
from tests.conftest import CPU_ONLY


def publish(checkpoint_dir, step: int, files: dict[str, bytes]):
    """A published tag as ``save`` leaves it: files, run state, manifest, ``latest``."""
    tag = C.tag_for(step)
    (checkpoint_dir / tag).mkdir(parents=True)
    for name, data in files.items():
        (checkpoint_dir / tag / name).write_bytes(data)
    (checkpoint_dir / tag / C.RUN_FILE).write_text(json.dumps({"step": step}))
    sizes = C.file_sizes(checkpoint_dir / tag)
    (checkpoint_dir / tag / C.MANIFEST).write_text(json.dumps({"files": sizes}))
    (checkpoint_dir / C.LATEST).write_text(tag)
    return checkpoint_dir / tag


FILES = {"mp_rank_00_model_states.pt": b"m" * 100, "rank_00000.pt": b"r" * 10,
         "rank_00001.pt": b"s" * 10}


def test_a_whole_latest_tag_is_resumed(tmp_path):
    publish(tmp_path, 4, FILES)
    publish(tmp_path, 8, FILES)
    assert C.resume_tag(tmp_path) == "step_0000008"
    assert C.resume_tag(tmp_path / "nothing") is None


@pytest.mark.parametrize("damage", ["delete", "truncate", "grow", "manifest"])
def test_a_damaged_latest_tag_falls_back_with_a_warning(tmp_path, caplog, damage):
    publish(tmp_path, 4, FILES)
    newest = publish(tmp_path, 8, FILES)
    if damage == "delete":
        (newest / "rank_00001.pt").unlink()
        what = "rank_00001.pt is missing"
    elif damage == "truncate":
        (newest / "mp_rank_00_model_states.pt").write_bytes(b"m" * 60)
        what = "mp_rank_00_model_states.pt has 60 bytes, 100 when it was published"
    elif damage == "grow":
        (newest / "rank_00000.pt").write_bytes(b"r" * 11)
        what = "rank_00000.pt has 11 bytes, 10 when it was published"
    else:
        (newest / C.MANIFEST).write_text("{")
        what = "manifest.json is unreadable"
    with caplog.at_level("WARNING"):
        assert C.resume_tag(tmp_path) == "step_0000004"
    assert f"checkpoint {newest} is damaged ({what})" in caplog.text
    assert (tmp_path / C.LATEST).read_text() == "step_0000004"
    assert not newest.exists() and (tmp_path / "damaged_step_0000008").is_dir()
    assert C.resume_tag(tmp_path) == "step_0000004"  # and quietly so from then on


def test_every_tag_damaged_is_one_sentence(tmp_path):
    for step in (4, 8):
        (publish(tmp_path, step, FILES) / "rank_00000.pt").unlink()
    with pytest.raises(C.CheckpointError) as err:
        C.resume_tag(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "step_0000008: rank_00000.pt is missing" in message
    assert "checkpointing.resume_from_ckpt=False" in message and "\n" not in message
    assert (tmp_path / "step_0000008").is_dir()  # nothing set aside: nothing to resume


def test_a_latest_naming_a_missing_tag_falls_back(tmp_path):
    publish(tmp_path, 4, FILES)
    (tmp_path / C.LATEST).write_text("step_0000008")
    assert C.resume_tag(tmp_path) == "step_0000004"


def test_a_tag_from_before_manifests_still_resumes(tmp_path):
    (publish(tmp_path, 4, FILES) / C.MANIFEST).unlink()
    assert C.resume_tag(tmp_path) == "step_0000004"


SAVE_FAULTS = textwrap.dedent("""
    import errno, hashlib, json, sys
    from pathlib import Path

    import deepspeed, torch

    from model import Diffusion, ModelConfig
    from pretrain import checkpointing as C, distributed as D
    from pretrain.ema import EMA
    from pretrain.train import LossModule

    D.init()
    torch.manual_seed(0)
    module = LossModule(Diffusion(ModelConfig(vocab_size=64, mask_index=63, length=16,
                                              hidden_size=32, n_heads=2, cond_dim=16,
                                              n_blocks=1)))
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=torch.optim.AdamW(module.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": 0}})
    ema = EMA(engine.module.named_parameters(), 0.9)
    root = Path(sys.argv[1])
    C.save(engine, root, 1, {"step": 1}, ema, keep_last=2)

    def snapshot():
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    before = snapshot()
    real = {"save": torch.save, "json": C.atomic_write_json, "bytes": C.atomic_write_bytes}
    calls = []

    def faulty(kind, fail_at):
        def write(*args, **kwargs):
            path = Path(args[1] if kind == "save" else args[0])
            calls.append((kind, path.name))
            if len(calls) - 1 == fail_at:
                if kind == "save":  # half a file, as a full disk leaves it
                    path.write_bytes(b"half a file")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real[kind](*args, **kwargs)
        return write

    results = []
    for fail_at in range(50):
        calls.clear()
        torch.save = faulty("save", fail_at)
        C.atomic_write_json, C.atomic_write_bytes = faulty("json", fail_at), faulty("bytes",
                                                                                   fail_at)
        try:
            C.save(engine, root, 2, {"step": 2}, ema, keep_last=2)
        except C.SaveError as err:
            after = snapshot()
            results.append({"write": calls[-1], "message": str(err),
                            "latest": (root / "latest").read_text(),
                            "previous_intact": all(after.get(k) == v
                                                   for k, v in before.items())})
            continue
        finally:
            torch.save = real["save"]
            C.atomic_write_json, C.atomic_write_bytes = real["json"], real["bytes"]
        results.append({"saved": (root / "latest").read_text(), "writes": len(calls)})
        break
    print(json.dumps(results))
""")


def test_a_failed_save_at_any_write_leaves_the_last_checkpoint_intact(tmp_path):
    script = tmp_path / "faults.py"
    script.write_text(SAVE_FAULTS)
    env = dict(os.environ, **CPU_ONLY, PYTHONPATH=os.getcwd())
    env.pop("RANK", None)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "checkpoints")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    *failed, last = results
    assert last == {"saved": "step_0000002", "writes": len(failed)}
    # DeepSpeed's model state, the rank file, run.json, the manifest, then latest
    assert [tuple(r["write"]) for r in failed] == [
        ("save", "mp_rank_00_model_states.pt"), ("save", ".rank_00000.pt.tmp"),
        ("json", "run.json"), ("json", "manifest.json"), ("bytes", "latest")]
    for r in failed:
        assert r["latest"] == "step_0000001" and r["previous_intact"], r
        assert r["message"].startswith("saving checkpoint step_0000002 in ")
        assert "No space left on device" in r["message"]
        assert "latest still names step_0000001, which is untouched" in r["message"]


def test_a_new_run_moves_another_runs_checkpoints_aside(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    publish(checkpoints, 4, FILES)
    moved = C.set_aside_for_a_new_run(checkpoints)
    assert moved.name.startswith("checkpoints.replaced-") and not checkpoints.exists()
    assert (moved / "step_0000004" / "rank_00000.pt").is_file()
    assert C.resume_tag(checkpoints) is None  # the new run's saves start afresh
    checkpoints.mkdir()
    assert C.set_aside_for_a_new_run(checkpoints) is None  # nothing to move
