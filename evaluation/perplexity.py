"""Test perplexity of any model of the ``model`` package, with a standard error.

The NLL is the sum of per-token losses over the real (attention-mask) tokens divided by
their number: the exact next-token NLL for AR, an upper bound (the diffusion ELBO, Monte
Carlo over t and the masks) otherwise. Each batch draws its noise from its own generator,
seeded by ``(seed, pass, batch index)``, so the result does not depend on how batches are
split across ranks. ``num_mc_samples`` passes over the data tighten the bound's estimate.

Standard error: 0 for AR (exact). With two or more passes, the Monte Carlo standard error
from the spread of the pass estimates. With one pass, the standard error of the ratio over
batches (delta method), which also counts how test batches differ from each other, so it
bounds the Monte Carlo error from above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from model.errors import UserError

LN2 = math.log(2)


def batch_generator(seed: int, mc_pass: int, index: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + mc_pass * 10_007 + index) % (2**63))
    return g


@torch.no_grad()
def perplexity(model, batches: Iterable[tuple[int, dict]], num_mc_samples: int = 1,
               seed: int = 0, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
               device=None) -> dict:
    """Evaluates ``model`` (a ``model.Diffusion``) on ``batches``: an iterable of
    ``(global batch index, {'input_ids', 'attention_mask'})`` (re-iterated per pass; the
    batches a rank holds). ``reduce`` sums a float64 tensor over ranks (identity on one)."""
    device = device or next(model.parameters()).device
    exact = model.parameterization == "ar"
    passes = 1 if exact else int(num_mc_samples)
    if passes < 1:
        raise UserError(f"eval.num_mc_samples={num_mc_samples} must be at least 1.")
    was_training = model.training
    model.eval()
    # per pass: sum of losses, tokens; over (pass, batch) units: sums for the delta method
    totals = torch.zeros(passes, 2, dtype=torch.float64)
    units = torch.zeros(5, dtype=torch.float64)  # n, sum S^2, sum S N, sum N^2, sequences
    try:
        for p in range(passes):
            for index, batch in batches:
                ids = batch["input_ids"].to(device)
                mask = batch["attention_mask"].to(device)
                out = model.loss(ids, mask, generator=batch_generator(seed, p, index, device))
                s = float(out.nlls.double().sum())
                n = float(out.token_mask.double().sum())
                totals[p] += torch.tensor([s, n], dtype=torch.float64)
                units += torch.tensor([1.0, s * s, s * n, n * n, ids.shape[0] if p == 0 else 0],
                                      dtype=torch.float64)
    finally:
        model.train(was_training)
    totals = reduce(totals.to(device)).cpu()
    units = reduce(units.to(device)).cpu()
    tokens = float(totals[0, 1])
    if tokens == 0:
        raise UserError("the evaluation data holds no real tokens; point data.valid at a "
                        "split with text in it.")
    estimates = totals[:, 0] / totals[:, 1]
    nll = float(totals[:, 0].sum() / totals[:, 1].sum())
    if exact:
        stderr = 0.0
    elif passes >= 2:
        stderr = float(estimates.std(unbiased=True) / math.sqrt(passes))
    else:
        count, s2, sn, n2 = (float(v) for v in units[:4])
        mean_n = tokens / count
        residual = s2 - 2 * nll * sn + nll * nll * n2  # sum over units of (S - nll N)^2
        stderr = math.sqrt(max(residual, 0.0) / (count * (count - 1))) / mean_n \
            if count > 1 else float("nan")
    return {"nll": nll, "ppl": math.exp(nll), "bpd": nll / LN2, "stderr": stderr,
            "tokens": int(tokens), "sequences": int(units[4]), "num_mc_samples": passes,
            "pass_nll": [float(e) for e in estimates]}


def shard_batches(dataset, batch_size: int, rank: int = 0, world_size: int = 1):
    """The batches of ``dataset`` that ``rank`` evaluates: global batch b goes to rank
    b mod world, so any number of ranks evaluates the same batches."""
    n = len(dataset)
    count = math.ceil(n / batch_size)

    def generate():
        for b in range(rank, count, world_size):
            rows = [dataset[i] for i in range(b * batch_size, min(n, (b + 1) * batch_size))]
            yield b, {key: torch.stack([r[key] for r in rows]) for key in rows[0]}

    class Batches:
        def __iter__(self):
            return generate()

    return Batches()
