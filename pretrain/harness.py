"""The LM Evaluation Harness model ``mdlm``: every model family here under ``lm_eval``.

    python -m pretrain.harness --model mdlm \\
        --model_args pretrained=kuleshov-group/mdlm-owt,tokenizer=gpt2,mc_samples=128 \\
        --tasks lambada_openai,wikitext

takes ``lm_eval``'s own arguments; it registers the model and runs the harness's command
line. In Python, ``import pretrain.harness`` and pass ``model="mdlm"`` to
``lm_eval.simple_evaluate``. ``lm_eval`` is an optional extra (``pip install lm_eval``).

- ``loglikelihood(context, continuation)``: exact for AR; for diffusion models (MDLM, SEDD,
  D3PM) the conditional bound of the continuation with the context kept clean, averaged
  over ``mc_samples`` Monte Carlo draws of (t, x_t): a lower bound on the log-likelihood.
  ``is_greedy``: every continuation token is the argmax (AR: given its prefix; diffusion:
  given the context with the whole continuation masked).
- ``loglikelihood_rolling``: the document cut into the harness's rolling windows of the
  model's length, each scored as above given its window of context.
- ``generate_until``: the context as a clean prefix, ``max_gen_toks`` new tokens (at most
  the model's length) from ``sampling``'s predictors (AR: token by token), cut at the first
  ``until`` string or EOS.

``model_args``: ``pretrained`` (run directory, ``.ckpt``, HF directory or hub id),
``tokenizer`` (default: the run's, else ``gpt2``; ``cache_dir`` for ``builtin``),
``mc_samples`` (32), ``mc_batch_size`` (Monte Carlo draws per forward, 32), ``device``
(or the harness's ``--device``), ``seed``, ``use_ema``, ``trust``, the
model's ``parameterization``, ``time_conditioning``, ``T``, and the sampler's
``predictor``, ``steps``, ``top_p``, ``temperature``, ``gumbel_dtype``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the optional extra is missing: the module still imports
    LM, register_model = object, None

from model import load_pretrained, tokenizer_ids
from model.errors import UserError

MODEL_OVERRIDES = ("parameterization", "time_conditioning", "T", "backbone", "subs_masking")
HARNESS_ARGS = ("batch_size", "max_batch_size")
KNOB_NAMES = ("predictor", "steps", "top_p", "temperature", "gumbel_dtype", "noise_removal")


def run_tokenizer(pretrained: str) -> str | None:
    """The tokenizer a run directory of ours was trained with."""
    path = Path(str(pretrained)).expanduser()
    for run_json in (sorted(path.glob("checkpoints/step_*/run.json"))[-1:] +
                     sorted(path.glob("step_*/run.json"))[-1:] + [path / "run.json"]):
        if run_json.is_file():
            config = json.loads(run_json.read_text()).get("config", {})
            return config.get("data", {}).get("tokenizer_name_or_path")
    return None


def _flag(value, name: str) -> bool:
    """A switch from ``model_args`` (the harness passes True/False, Python callers may pass
    strings)."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise UserError(f"model_args {name}={value} is not a switch; use true or false.")
        return value.lower() in ("true", "1")
    return bool(value)


class MDLMHarness(LM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, mc_samples: int = 32,
                 mc_batch_size: int = 32, device: str | None = None, seed: int = 0,
                 use_ema: bool = True, trust: bool = False, max_gen_toks: int = 256,
                 cache_dir: str | None = None, **options):
        super().__init__()
        from pretrain.data.tokenizers import get_tokenizer

        for key in HARNESS_ARGS:  # the harness's own batching: requests go one at a time
            options.pop(key, None)
        unknown = set(options) - set(MODEL_OVERRIDES) - set(KNOB_NAMES)
        if unknown:
            raise UserError(f"model_args {sorted(unknown)} are not settings of the mdlm model; "
                            "use pretrained, tokenizer, mc_samples, mc_batch_size, device, seed, "
                            f"use_ema, trust, max_gen_toks, cache_dir, "
                            f"{', '.join(MODEL_OVERRIDES)} or {', '.join(KNOB_NAMES)}.")
        if int(mc_samples) < 1 or int(mc_batch_size) < 1:
            raise UserError(f"mc_samples={mc_samples} and mc_batch_size={mc_batch_size} must "
                            "be at least 1.")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = get_tokenizer(tokenizer or run_tokenizer(pretrained) or "gpt2",
                                       cache_dir)
        overrides = {k: options[k] for k in MODEL_OVERRIDES if k in options}
        self.model = load_pretrained(pretrained, use_ema=_flag(use_ema, "use_ema"),
                                     device=self._device, trust=_flag(trust, "trust"),
                                     **overrides).eval()
        ids = tokenizer_ids(self.tokenizer)
        if (ids["vocab_size"], ids["mask_index"]) != (self.model.vocab_size,
                                                      self.model.mask_index):
            raise UserError(f"the checkpoint {pretrained} has vocab_size="
                            f"{self.model.vocab_size} and mask id {self.model.mask_index}, but "
                            f"the tokenizer gives {ids['vocab_size']} and {ids['mask_index']}; "
                            "pass the checkpoint's tokenizer as model_args tokenizer=...")
        self.bos = ids["bos_index"] if ids["bos_index"] is not None else ids["eos_index"]
        self.eos = ids["eos_index"]
        self.length = int(self.model.config.length)
        self.mc_samples, self.batch = int(mc_samples), int(mc_batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.knobs = {k: options[k] for k in KNOB_NAMES if k in options}
        self.ar = self.model.parameterization == "ar"
        if self.model.parameterization == "bd3lm":
            raise UserError("the LM Evaluation Harness model scores MDLM, SEDD, D3PM and AR "
                            "checkpoints, not block diffusion (parameterization=bd3lm); use "
                            "mode=ppl_eval for its likelihood.")

    # ------------------------------------------------------------------ helpers
    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator(device=self._device).manual_seed(self.seed * 1_000_003 + index)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As the harness's own models split them: the context's trailing spaces go to the
        continuation, whose tokens are those the whole text adds to the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context) if context else []
        return (context_ids or [self.bos]), whole[len(context_ids):]

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int], index: int = 0):
        """(log-likelihood of ``continuation`` given ``context``, is it greedy)."""
        if self.ar:
            return self._score_ar(context, continuation)
        return self._score_diffusion(context, continuation, index)

    def _score_ar(self, context, continuation):
        sequence = (context + continuation)[-(self.length + 1):]
        n = min(len(continuation), len(sequence) - 1)
        x = torch.tensor([sequence], device=self._device)
        log_probs = self.model.backbone(x[:, :-1], None)[0, -n:].double()
        targets = x[0, -n:]
        picked = log_probs.gather(-1, targets[:, None]).squeeze(-1)
        return float(picked.sum()), bool((log_probs.argmax(-1) == targets).all())

    def _score_diffusion(self, context, continuation, index):
        sequence = (context + continuation)[-self.length:]
        n = min(len(continuation), len(sequence))
        x0 = torch.tensor([sequence], device=self._device)
        keep = torch.zeros_like(x0, dtype=torch.bool)
        keep[:, : len(sequence) - n] = True
        generator = self._generator(index)
        total, draws = 0.0, 0
        while draws < self.mc_samples:
            rows = min(self.batch, self.mc_samples - draws)
            _, nlls = self.model.masked_losses(
                x0.expand(rows, -1), (~keep).expand(rows, -1).long(), generator=generator,
                keep=keep.expand(rows, -1))
            total += float(nlls.double().sum())
            draws += rows
        masked = torch.where(keep, x0, torch.full_like(x0, self.model.mask_index))
        noise = self.model.noise(torch.ones(1, device=self._device))[0]
        greedy = self.model(masked, noise).argmax(-1)
        return -total / draws, bool((greedy[~keep] == x0[~keep]).all())

    # ------------------------------------------------------------------ the harness's API
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        from tqdm import tqdm

        out = []
        for i, request in enumerate(tqdm(requests, disable=disable_tqdm or self.rank != 0,
                                         desc="loglikelihood")):
            context, continuation = request.args
            out.append(self.score(*self.encode_pair(context, continuation), index=i))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        from tqdm import tqdm

        # AR scores L next tokens from L inputs; a diffusion model holds L tokens in all
        window = self.length if self.ar else self.length - 1
        out = []
        for i, request in enumerate(tqdm(requests, disable=disable_tqdm or self.rank != 0,
                                         desc="loglikelihood_rolling")):
            (text,) = request.args
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.encode(text), prefix_token=self.bos, max_seq_len=window,
                context_len=1))
            out.append(sum(self.score(list(c), list(p), index=i * 100_003 + j)[0]
                           for j, (c, p) in enumerate(windows)))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False):
        from tqdm import tqdm

        out = []
        for i, request in enumerate(tqdm(requests, disable=disable_tqdm or self.rank != 0,
                                         desc="generate_until")):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = max(1, min(int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                             self.length - 1))
            prompt = (self.encode(context) or [self.bos])[-(self.length - new):]
            tokens = self.generate(prompt, new, i)
            if self.eos is not None and self.eos in tokens:
                tokens = tokens[: tokens.index(self.eos)]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = min([text.index(u) for u in until if u and u in text], default=len(text))
            out.append(text[:cut])
        return out

    def generate(self, prompt: list[int], new: int, index: int) -> list[int]:
        """``new`` tokens after ``prompt``."""
        generator = self._generator(index)
        x = torch.tensor([prompt], device=self._device)
        if self.ar:
            return self._generate_ar(x, new, generator)
        from sampling import Knobs, sample

        knobs = Knobs().replace(**self.knobs) if self.knobs else Knobs()
        tokens, _ = sample(self.model, 1, len(prompt) + new, knobs, generator=generator,
                           prefix=x)
        return tokens[0, len(prompt):].tolist()

    def _generate_ar(self, x, new, generator):
        from sampling import sample_categorical

        temperature = float(self.knobs.get("temperature", 1.0))
        backbone = self.model.backbone
        cache = backbone.new_cache()
        log_probs = backbone.forward_cached(x, cache)[:, -1]
        tokens = []
        for _ in range(new):
            if temperature == 0 or "temperature" not in self.knobs:
                token = log_probs.argmax(-1)  # the harness's default: greedy decoding
            else:
                token = sample_categorical((log_probs.double() / temperature).softmax(-1),
                                           generator)
            tokens.append(int(token))
            log_probs = backbone.forward_cached(token.view(1, 1), cache)[:, -1]
        return tokens


if register_model is not None:
    register_model("mdlm")(MDLMHarness)


def main() -> None:
    if register_model is None:
        print("harness: the LM Evaluation Harness is not installed; pip install lm_eval.",
              file=sys.stderr)
        sys.exit(2)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
