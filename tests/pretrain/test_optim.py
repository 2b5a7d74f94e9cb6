"""DeepSpeed's CPU AdamW against torch's, in process (the op is compiled once per machine)."""

import os

import pytest
import torch
from omegaconf import OmegaConf

from pretrain import optim
from pretrain.ds_config import RunConfigError


def run_cfg(impl="auto", weight_decay=0.1):
    return OmegaConf.create({"optim": {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                                       "weight_decay": weight_decay, "impl": impl}})


def module(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(37, 53), torch.nn.Tanh(), torch.nn.Linear(53, 5))


def train(net, optimizer, steps, seed=1, lr_zero_at=()):
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(16, 37, generator=generator)
        optimizer.zero_grad()
        net(x).pow(2).mean().backward()
        for group in optimizer.param_groups:
            group["lr"] = 0.0 if step in lr_zero_at else 1e-2
        optimizer.step()


def fixed_gradient_steps(impl, steps=10):
    """``steps`` AdamW steps on a matrix and a vector with the same random gradients (not
    depending on the weights, so rounding differences do not feed back)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(53, 37)), torch.nn.Parameter(torch.randn(53))]
    start = [p.detach().clone() for p in params]
    optimizer = optim.build(torch.nn.ParameterList(params), run_cfg(impl), {})
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return optimizer, start, [p.detach() for p in params]


def test_cpu_adam_equals_torch_adamw():
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    reference, start, expected = fixed_gradient_steps("torch")
    ours, _, got = fixed_gradient_steps("auto")
    assert isinstance(reference, torch.optim.AdamW)
    assert isinstance(ours, DeepSpeedCPUAdam) and ours.adam_w_mode
    for a, b, w in zip(expected, got, start):
        assert (a - w).norm() > 0.02 * w.norm()  # Adam and the weight decay moved them
        assert (b - a).norm() <= 1e-6 * a.norm()
        assert (b - a).norm() <= 1e-4 * (a - w).norm()  # the updates agree too


def test_zero_lr_leaves_weights_unchanged_with_weight_decay():
    net = module()
    optimizer = optim.build(net, run_cfg("deepspeed", weight_decay=0.5), {})
    train(net, optimizer, 3)
    before = [p.detach().clone() for p in net.parameters()]
    train(net, optimizer, 1, seed=2, lr_zero_at=(0,))  # as train.py skips a NaN step
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    train(net, optimizer, 1, seed=3)
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_resumed_optimizer_continues_bit_identically():
    straight_net = module()
    straight = optim.build(straight_net, run_cfg(), {})
    train(straight_net, straight, 12)
    first_net = module()
    first = optim.build(first_net, run_cfg(), {})
    train(first_net, first, 5)
    resumed_net = module()
    resumed_net.load_state_dict(first_net.state_dict())
    resumed = optim.build(resumed_net, run_cfg(), {})
    resumed.load_state_dict(first.state_dict())
    generator_skip = 5  # continue the data stream where the first run stopped
    generator = torch.Generator().manual_seed(1)
    for step in range(12):
        x = torch.randn(16, 37, generator=generator)
        if step < generator_skip:
            continue
        resumed.zero_grad()
        resumed_net(x).pow(2).mean().backward()
        resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(straight_net.parameters(),
                                                 resumed_net.parameters()))


def test_bad_impl_is_refused():
    with pytest.raises(RunConfigError, match="optim.impl=fast"):
        optim.build(module(), run_cfg("fast"), {})


def test_arch_list_in_the_form_deepspeed_parses(monkeypatch):
    """CUDA images set architecture-specific targets (9.0a) that DeepSpeed's JIT builder
    cannot parse; its build sees the base architectures, and the variable comes back."""
    from pretrain.optim import arch_list_deepspeed_reads, deepspeed_arch_list

    assert deepspeed_arch_list("9.0a") == "9.0"
    assert deepspeed_arch_list("8.0 9.0;9.0a+PTX") == "8.0;9.0;9.0+PTX"
    assert deepspeed_arch_list("10.0f;12.0") == "10.0;12.0"
    assert deepspeed_arch_list("Hopper") == ""
    assert deepspeed_arch_list("8.0;Hopper") == ""  # not fewer targets: the GPUs seen
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    with arch_list_deepspeed_reads():
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0a"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "All")
    with arch_list_deepspeed_reads():
        assert "TORCH_CUDA_ARCH_LIST" not in os.environ
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "All"


def test_a_killed_builds_lock_is_removed_and_a_running_one_waited_for(tmp_path, monkeypatch,
                                                                      caplog):
    """torch waits for an op build's lock with no time limit: a lock left by a killed build
    would hang every later run at start-up. An old one is removed; a young one (another
    process building) is waited for until it goes, or until it is old."""
    import logging
    import os
    import threading
    import time

    from pretrain.optim import build_lock_files, settle_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for op in ("cpu_adam", "fused_adam", "deepspeed_shm_comm"):
        (tmp_path / op).mkdir()
    left = tmp_path / "cpu_adam" / "lock"
    left.touch()
    os.utime(left, (time.time() - 3600, time.time() - 3600))
    building = tmp_path / "fused_adam" / "lock"
    building.touch()
    threading.Timer(0.3, building.unlink).start()  # that build finishes
    assert build_lock_files() == [left, building]
    with caplog.at_level(logging.INFO, logger="pretrain.optim"):
        started = time.monotonic()
        assert settle_build_locks(poll=0.05) == [left]
    assert 0.25 < time.monotonic() - started < 5
    assert not left.exists() and not building.exists()
    assert "did not finish; the op is built again" in caplog.text
    assert "waiting for another process's build of DeepSpeed's fused_adam op" in caplog.text
    # a young lock whose build never ends is removed once it is old
    stuck = tmp_path / "deepspeed_shm_comm" / "lock"
    stuck.touch()
    assert settle_build_locks(stale_after=0.2, poll=0.05) == [stuck]
