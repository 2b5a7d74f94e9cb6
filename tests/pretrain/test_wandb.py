"""Weights & Biases beside TensorBoard: when it is on, and what an offline run holds."""

import json
import struct
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from model.errors import ConfigError
from pretrain import wandb_log

wandb = pytest.importorskip("wandb")


def read_records(path: Path) -> list:
    """The protobuf records of an offline run's ``.wandb`` file: a 7-byte header, then
    LevelDB-log blocks of 32 KiB whose records (crc32, length, type, data) may be split
    across blocks (type 2 first, 3 middle, 4 last; 1 whole)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def history(run_dir: Path) -> tuple[str, dict]:
    """(run id, {step: {key: value}}) of one offline run directory."""
    (file,) = run_dir.glob("run-*.wandb")
    run_id, rows = None, {}
    for record in read_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                     for i in record.history.item}
            rows.setdefault(int(items["_step"]), {}).update(items)
    return run_id, rows


def cfg(**block):
    return OmegaConf.create({"wandb": {"enabled": "auto", "project": "p", "id": None,
                                       **block}})


def test_auto_is_on_only_when_asked(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not wandb_log.wanted(cfg())  # installed, but nobody asked
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not wandb_log.wanted(cfg())
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_log.wanted(cfg())
    assert not wandb_log.wanted(cfg(enabled=False))
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_log.wanted(cfg(enabled=True))
    monkeypatch.setattr(wandb_log, "_command_line_keys", lambda: ["wandb.name"])
    assert wandb_log.wanted(cfg())
    monkeypatch.setattr(wandb_log, "installed", lambda: False)
    assert not wandb_log.wanted(cfg())  # the release's keys then only get the notice
    with pytest.raises(ConfigError, match="needs the wandb package"):
        wandb_log.wanted(cfg(enabled=True))
    with pytest.raises(ConfigError, match="not a switch"):
        wandb_log.wanted(cfg(enabled="maybe"))


def test_run_id_is_kept_in_the_run_dir(tmp_path):
    first = wandb_log.run_id(cfg()["wandb"], tmp_path)
    assert (tmp_path / wandb_log.ID_FILE).read_text().strip() == first
    assert wandb_log.run_id(cfg()["wandb"], tmp_path) == first  # a requeued start
    assert wandb_log.run_id(cfg(id="mine")["wandb"], tmp_path) == "mine"  # wandb.id wins
    assert wandb_log.run_id(cfg()["wandb"], tmp_path) == "mine"


@pytest.mark.slow
def test_two_rank_run_logs_the_losses_of_metrics_jsonl(tmp_path, tmp_path_factory,
                                                       monkeypatch):
    from tests.pretrain.test_train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    run = tmp_path / "run"
    data = tmp_path_factory.mktemp("data")
    train(run, data, "trainer.deepspeed_config=zero2", "trainer.max_steps=4",
          "checkpointing.every_n_steps=1000", "wandb.name=tiny", "wandb.group=g",
          "wandb.tags=[a,b]")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    (one,) = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))  # rank 0 only
    run_id, rows = history(one)
    assert run_id == (run / wandb_log.ID_FILE).read_text().strip()
    assert sorted(rows) == [1, 2, 3, 4]
    for r in records:
        assert rows[r["step"]]["train/loss"] == r["loss"]
        assert rows[r["step"]]["train/lr"] == r["lr"]
        assert rows[r["step"]]["train/tokens"] == r["tokens"]

    # a requeued start continues the same W&B run
    train(run, data, "trainer.deepspeed_config=zero2", "trainer.max_steps=6",
          "checkpointing.every_n_steps=1000", "wandb.name=tiny")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    first, second = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert first == one
    resumed_id, rows = history(second)
    assert resumed_id == run_id
    assert sorted(rows) == [5, 6]
    for r in records[4:]:
        assert rows[r["step"]]["train/loss"] == r["loss"]
