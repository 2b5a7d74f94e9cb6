import pytest

from pretrain.data.sampler import ResumableSampler

N, GLOBAL = 103, 8  # 12 full global batches; the last 7 samples of each epoch are dropped


def ranks(world, **kw):
    return [ResumableSampler(N, GLOBAL, rank=r, world_size=world, seed=5, **kw)
            for r in range(world)]


def take(samplers, steps):
    """What each rank feeds to ``steps`` optimizer steps (GLOBAL / world samples per step)."""
    per_rank = GLOBAL // len(samplers) * steps
    out = [list(iter(s))[:per_rank] for s in samplers]
    for s in samplers:
        s.advance(GLOBAL * steps)
    return out


def test_two_ranks_cover_each_index_at_most_once_per_epoch():
    a, b = ranks(2)
    ia, ib = list(a), list(b)
    assert len(ia) == len(ib) == len(a) == 48
    assert not set(ia) & set(ib)
    assert len(set(ia) | set(ib)) == 96  # 12 global batches; the partial 13th is dropped
    assert set(ia) | set(ib) == set(a.order(0))
    assert a.steps_per_epoch == 12


def test_resume_continues_the_same_order():
    reference = ranks(2)
    uninterrupted = take(reference, 12)
    run = ranks(2)
    first = take(run, 5)
    state = run[0].state_dict()
    assert state == run[1].state_dict() == {"epoch": 0, "consumed": 40, "seed": 5,
                                            "num_samples": N}
    resumed = ranks(2)
    for s in resumed:
        s.load_state_dict(state)
    rest = take(resumed, 7)
    assert [f + r for f, r in zip(first, rest)] == uninterrupted
    assert resumed[0].state_dict()["epoch"] == 1  # rolled over at the end of the epoch


def test_resume_on_another_world_size_keeps_the_global_order():
    two = ranks(2)
    take(two, 3)
    one = ranks(1)
    one[0].load_state_dict(two[0].state_dict())
    assert list(one[0]) == two[0].order(0)[24:]


def test_epochs_reshuffle_and_seeds_differ():
    s = ranks(1)[0]
    assert s.order(0) != s.order(1)
    assert s.order(0) != ResumableSampler(N, GLOBAL, seed=6).order(0)
    assert ResumableSampler(N, GLOBAL, shuffle=False).order(0) == list(range(96))


def test_bad_setups_are_refused():
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        ResumableSampler(N, GLOBAL, world_size=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(5, GLOBAL)
    s = ranks(1)[0]
    with pytest.raises(ValueError, match="dataset of 50 sequences"):
        s.load_state_dict({"epoch": 0, "consumed": 8, "num_samples": 50})
