import json

import pytest
import torch

from pretrain.data.prepare import BuildSpec, build
from pretrain.data.shards import ShardDataset, ShardError
from pretrain.data.tokenizers import vocab_hash
from tests.pretrain.data_helpers import corpus, word_tokenizer


@pytest.fixture
def built(tmp_path):
    tok = word_tokenizer("gpt2")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus(50)))
    spec = BuildSpec(str(data), "train", "words", 8, True, str(tmp_path / "c"), docs_per_shard=20)
    return build(spec, tok, progress=False), tok


def test_reader_checks_and_reads(built):
    directory, tok = built
    expect = {"vocab_hash": vocab_hash(tok), "vocab_size": len(tok), "block_size": 8,
              "mode": "wrap"}
    ds = ShardDataset(directory, expect=expect)
    assert len(ds) == ds.meta["num_sequences"] and (directory / ".verified").exists()
    item = ds[len(ds) - 1]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (8,)
    assert torch.equal(ds[-1]["input_ids"], item["input_ids"])
    with pytest.raises(IndexError):
        ds[len(ds)]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    first = next(iter(loader))["input_ids"]
    assert torch.equal(first, torch.stack([ds[i]["input_ids"] for i in range(4)]))


def test_flipped_byte_fails_its_checksum(built):
    directory, _ = built
    path = directory / "shard_00001.bin"
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard_00001.bin fails its checksum"):
        ShardDataset(directory)
    ShardDataset(directory, verify=False)  # checksums can be turned off


def test_truncated_shard(built):
    directory, _ = built
    path = directory / "shard_00000.bin"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ShardError, match="truncated or damaged"):
        ShardDataset(directory, verify=False)


def test_checksums_are_verified_once(built):
    directory, _ = built
    ShardDataset(directory)
    path = directory / "shard_00001.bin"
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    ShardDataset(directory)  # remembered as verified: sizes are still checked on every open
    (directory / ".verified").unlink()
    with pytest.raises(ShardError, match="checksum"):
        ShardDataset(directory)


@pytest.mark.parametrize("key, value, names", [
    ("vocab_hash", "0123456789abcdef", "data.tokenizer_name_or_path"),
    ("block_size", 1024, "model.length"),
    ("mode", "pad", "data.wrap"),
    ("vocab_size", 50258, "vocabulary size"),
])
def test_run_mismatch_is_named(built, key, value, names):
    directory, _ = built
    with pytest.raises(ShardError, match=f"{key}=.*{names}.*rebuild"):
        ShardDataset(directory, expect={key: value})
