"""Weights & Biases beside TensorBoard: when it is on, and what an offline run holds."""

import json
import struct
import time
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
    assert not wandb_log.wanted(cfg()) and not wandb_log.wanted(cfg(enabled=True))
    monkeypatch.setenv("WANDB_MODE", "online")  # exported for everyone on a cluster
    assert not wandb_log.wanted(cfg())
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_log.wanted(cfg(enabled=True))
    monkeypatch.setattr(wandb_log, "_command_line_keys", lambda: ["wandb.name"])
    assert wandb_log.wanted(cfg())
    assert not wandb_log.wanted(cfg(enabled=False))
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
    fresh = wandb_log.run_id(cfg()["wandb"], tmp_path, resumed=False)  # a new run, same dir
    assert fresh != "mine" and (tmp_path / wandb_log.ID_FILE).read_text().strip() == fresh


@pytest.mark.slow
def test_two_rank_run_logs_the_losses_of_metrics_jsonl(tmp_path, tmp_path_factory,
                                                       monkeypatch):
    from tests.pretrain.test_train import train

    monkeypatch.delenv("WANDB_MODE", raising=False)  # on through the command line's keys
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    run = tmp_path / "run"
    data = tmp_path_factory.mktemp("data")
    train(run, data, "trainer.deepspeed_config=zero2", "trainer.max_steps=4",
          "checkpointing.every_n_steps=1000", "wandb.name=tiny", "wandb.group=g",
          "wandb.tags=[a,b]", "+wandb.offline=true")
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
    (file,) = one.glob("run-*.wandb")
    (info,) = [r.run for r in read_records(file) if r.WhichOneof("record_type") == "run"]
    assert (info.display_name, info.run_group, list(info.tags)) == ("tiny", "g", ["a", "b"])
    assert info.project == "text-diffusion"


def test_a_requeued_start_continues_the_same_wandb_run(tmp_path, monkeypatch):
    """What train does through MetricsLog on rank 0, started twice in one run directory:
    the second start (from a checkpoint at step 2) resumes the first's W&B run and does not
    log the steps it already holds again."""
    from pretrain.metrics import MetricsLog

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    config = OmegaConf.create({"wandb": {"enabled": True, "project": "p", "name": "n",
                                         "id": None, "tags": ["t" * 100]}, "seed": 1})
    for start, stop in ((0, 3), (2, 5)):
        log = MetricsLog(tmp_path / "run", True, start, 5, 1000, config)
        for step in range(start + 1, stop + 1):
            log.log(step, {"loss": 1.0 / step + start, "lr": 0.1, "grad_norm": float("nan")})
        log.log(stop, {"nll": 2.0}, prefix="val")
        log.close()
        time.sleep(1.1)  # offline run directories are named to the second
    first, second = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    (id1, rows1), (id2, rows2) = history(first), history(second)
    assert id1 == id2 == (tmp_path / "run" / wandb_log.ID_FILE).read_text().strip()
    assert sorted(rows1) == [1, 2, 3] and sorted(rows2) == [3, 4, 5]
    assert rows2[3]["train/loss"] == 1.0 / 3 + 2 and rows1[3]["train/loss"] == 1.0 / 3
    assert rows2[5]["val/nll"] == 2.0 and "train/grad_norm" not in rows2[5]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    train_losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert train_losses == {s: rows[s]["train/loss"] for rows in (rows1, rows2) for s in rows
                            if (rows is rows2 or s <= 2)}
