"""The ``mdlm`` command line (also ``python -m pretrain``): one Hydra config, many modes."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from pretrain.resolvers import absolutize_paths, register

register()

# mode -> (module, function, what it needs)
MODES = {
    "train": ("pretrain.train", "run", "the training loop"),
    "ppl_eval": ("pretrain.evaluate", "run", "perplexity evaluation"),
    "sample_eval": ("pretrain.sample", "run", "sampling"),
}


class UsageError(SystemExit):
    """Stops the command with one sentence on stderr and exit status 2."""

    def __init__(self, message: str):
        print(f"mdlm: {message}", file=sys.stderr)
        super().__init__(2)


def check_config(cfg: DictConfig) -> None:
    """Stops early on settings that cannot work, before any data or model is touched."""
    from model import ConfigError, from_run_config

    if cfg.mode not in MODES:
        raise UsageError(f"mode={cfg.mode} is not a mode; use one of {sorted(MODES)}.")
    check_run_values(cfg)
    if cfg.backbone == "hf_dit":
        if not cfg.eval.checkpoint_path:
            raise UsageError("backbone=hf_dit loads a pretrained model: set "
                             "eval.checkpoint_path to its hub id or directory "
                             "(e.g. kuleshov-group/mdlm-owt).")
        return
    try:
        # The vocabulary comes from the tokenizer later; a placeholder checks the rest.
        from_run_config(cfg, vocab_size=2, mask_index=1)
    except ConfigError as err:
        raise UsageError(str(err)) from None


def _looks_local(name: str) -> bool:
    """A path as the user wrote it (not a hub id such as ``gpt2-large`` or ``org/name``)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def check_run_values(cfg: DictConfig) -> None:
    """The run's counts, sizes and names that no mode can use, each refused in one sentence
    before any data or checkpoint is read."""
    def at_least(key: str, low: int, meaning: str) -> None:
        value = OmegaConf.select(cfg, key)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{key}={value} must be a whole number >= {low} ({meaning}).")

    at_least("loader.batch_size", 1, "sequences per rank and micro-step")
    at_least("loader.eval_batch_size", 1, "sequences per rank in evaluation and sampling")
    at_least("loader.num_workers", 0, "data-loader processes per rank; 0 loads in the rank")
    at_least("trainer.max_steps", 0, "optimizer steps of the run")
    at_least("trainer.val_check_interval", 0, "steps between validations; 0 never validates")
    at_least("checkpointing.every_n_steps", 0, "steps between checkpoints; 0 saves at the "
                                               "end and on a stop signal only")
    at_least("checkpointing.keep_last", 0, "checkpoints kept; 0 keeps every one")
    at_least("eval.perplexity_batch_size", 1, "samples per batch of the generative-"
                                              "perplexity judge")
    at_least("eval.num_mc_samples", 1, "passes over the data for the diffusion bound")
    if cfg.mode == "ppl_eval" and cfg.eval.get("zero_shot", False) and not list(
            cfg.eval.get("zero_shot_datasets") or []):
        raise UsageError("eval.zero_shot=True but eval.zero_shot_datasets is empty; list the "
                         "datasets to evaluate, e.g. eval.zero_shot_datasets=[ptb,wikitext2].")
    generative = (cfg.mode == "sample_eval" or (
        cfg.mode == "train" and cfg.eval.get("generate_samples", False))) and bool(
        cfg.eval.get("compute_generative_perplexity", False))
    judge = str(cfg.eval.get("gen_ppl_eval_model_name_or_path") or "")
    if generative and _looks_local(judge) and not os.path.isdir(os.path.expanduser(judge)):
        raise UsageError(f"eval.gen_ppl_eval_model_name_or_path={judge} is not a directory; "
                         "name a saved Hugging Face causal LM or a hub id such as "
                         "gpt2-large.")
    path = str(cfg.eval.get("checkpoint_path") or "")
    if cfg.mode != "train" and _looks_local(path) and not os.path.exists(
            os.path.expanduser(path)):
        raise UsageError(f"eval.checkpoint_path={path} does not exist; point it at a run "
                         "directory, a .ckpt file, an HF directory or a hub id.")


def _user_errors() -> tuple:
    """Errors whose message is the whole story: printed as one line, no traceback."""
    from model.errors import UserError

    return (UserError, FloatingPointError)


def report_safe_loads() -> None:
    """What a checkpoint load left out (``model.checkpoint.safe``) is printed as one notice
    on stderr, like the command's other notes, not among Hydra's log lines on stdout."""
    import logging

    from model.checkpoint import safe

    logger = logging.getLogger(safe.__name__)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mdlm: note: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def dispatch(cfg: DictConfig):
    absolutize_paths(cfg)
    check_config(cfg)
    report_safe_loads()
    module_name, function, what = MODES[cfg.mode]
    if importlib.util.find_spec(module_name) is None:
        raise UsageError(f"mode={cfg.mode} is not available in this version: {what} "
                         f"({module_name}) is not built yet.")
    from pretrain import watchdog

    ok = False
    try:
        result = getattr(importlib.import_module(module_name), function)(cfg)
        ok = True
        return result
    except _user_errors() as err:
        raise UsageError(str(err)) from None
    finally:
        watchdog.leave(ok)  # the other ranks learn whether this one ended well
        if ok:
            _close_process_group()


def _close_process_group() -> None:
    """Takes the process group down before the interpreter exits: left to the exit's own
    clean-up, its threads can abort the process ("terminate called without an active
    exception") after a run that finished well."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# Keys of the release that do (almost) nothing here: accepted, with a one-line notice.
_NO_EFFECT = "it has no effect here"
_RANKS = "the launcher decides the ranks here; it only enters the default loader.batch_size"
RELEASE_ONLY = {
    "trainer.devices": _RANKS,
    "trainer.num_nodes": _RANKS,
    "trainer.accelerator": f"{_NO_EFFECT} (DeepSpeed picks the accelerator)",
    "trainer.accumulate_grad_batches": f"{_NO_EFFECT} (accumulation = global batch / "
                                       "(loader.batch_size x ranks))",
    "trainer.num_sanity_val_steps": _NO_EFFECT,
    "trainer.limit_train_batches": _NO_EFFECT,
    "eval.compute_perplexity_on_sanity": _NO_EFFECT,
}
GROUPS = ("model", "data", "noise", "lr_scheduler")
# The release's Lightning-only groups: its DDP/FSDP strategy (DeepSpeed's config is
# trainer.deepspeed_config here) and its callbacks (checkpointing.* here). Their overrides
# are dropped before Hydra sees them, with a notice; the one with a meaning here is renamed.
LIGHTNING_GROUPS = ("strategy", "callbacks")
RENAMED = {"callbacks.checkpoint_every_n_steps.every_n_train_steps":
           "checkpointing.every_n_steps"}


def _flat_keys(node, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig as Dict

    keys = []
    for key in node.keys():
        path = f"{prefix}{key}"
        keys.append(path)
        child = node._get_node(key)
        if isinstance(child, Dict):
            keys.extend(_flat_keys(child, path + "."))
    return keys


def _note(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # once, not once per rank
        print(f"mdlm: note: {text}", file=sys.stderr)


def translate_lightning(argv: list[str]) -> list[str]:
    """``argv`` without the release's ``strategy``/``callbacks`` overrides (each noted), the
    checkpoint interval renamed to ours."""
    out = []
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        root = key.split(".")[0].split("@")[0]
        if not sep or root not in LIGHTNING_GROUPS or arg.startswith("-"):
            out.append(arg)
        elif key in RENAMED:
            _note(f"{key}={value} is read as {RENAMED[key]}={value}.")
            out.append(f"{RENAMED[key]}={value}")
        else:
            _note(f"{arg} is accepted for compatibility with the MDLM release; {_NO_EFFECT} "
                  "(Lightning's strategy and callbacks are trainer.deepspeed_config and "
                  "checkpointing.* here).")
    return out


# The BD3-LM release's command lines: its ``algo`` group (algo=bd3lm|mdlm|ar|sedd and
# algo.* keys) and a few sampling/data keys, read as this project's settings.
ALGOS = {
    "bd3lm": ("parameterization=bd3lm", "backbone=dit", "time_conditioning=False",
              "ignore_bos=True"),
    "mdlm": ("parameterization=subs", "backbone=dit", "time_conditioning=False"),
    "ar": ("parameterization=ar", "backbone=ar", "time_conditioning=False"),
    "sedd": ("parameterization=sedd", "backbone=dit", "time_conditioning=True"),
}
ALGO_KEYS = {"algo.backbone": "backbone", "algo.parameterization": "parameterization",
             "algo.time_conditioning": "time_conditioning", "algo.ignore_bos": "ignore_bos",
             "algo.clip_search_widths": "training.clip_search_widths",
             "algo.clip_search_delta": "training.clip_search_delta",
             "algo.fix_clipping": "training.fix_clipping",
             "sampling.nucleus_p": "sampling.top_p"}
BD3LM_RELEASE_DEFAULTS = {"sampling.num_sample_batches": 1, "eval.generate_samples": False}
ALGO_NO_EFFECT = ("algo.name", "algo.sampler", "algo.causal_attention", "algo.dropout",
                  "algo.mdlm_loss_scale", "sampling.logdir")
# ours too (config.yaml), which the release's scripts sometimes add with a "+"
INSERT_KEYS = ("data.insert_train_special", "data.insert_valid_special",
               "data.insert_train_eos", "data.insert_valid_eos")


def translate_algo(argv: list[str]) -> list[str]:
    """``argv`` with the BD3-LM release's keys read as ours (each noted once): ``algo=X``
    becomes its parameterization, backbone and time conditioning; ``algo.T`` the number of
    sampling steps for bd3lm (T otherwise); ``sampling.first_hitting`` the predictor.
    ``model.attn_backend=flex`` is ours as well (flex attention on CUDA)."""
    algo = next((a.partition("=")[2] for a in argv if a.startswith("algo=")), None)
    if algo is not None and algo not in ALGOS:
        raise UsageError(f"algo={algo} is not one of the BD3-LM release's algorithms "
                         f"{sorted(ALGOS)}.")
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-"):
            out.append(arg)
        elif key == "algo":
            read = list(ALGOS[value])
            given = {a.partition("=")[0] for a in argv}
            if value == "bd3lm" and not given & {"sampling.first_hitting",
                                                 "sampling.predictor"}:
                read.append("sampling.predictor=first_hitting")
            # the BD3-LM release's defaults where ours differ
            read += [f"{k}={v}" for k, v in BD3LM_RELEASE_DEFAULTS.items() if k not in given]
            _note(f"algo={value} is read as {' '.join(read)}.")
            out.extend(read)
        elif arg == "wandb=null":
            _note("wandb=null is read as wandb.enabled=false.")
            out.append("wandb.enabled=false")
        elif key in ALGO_KEYS:
            _note(f"{key}={value} is read as {ALGO_KEYS[key]}={value}.")
            out.append(f"{ALGO_KEYS[key]}={value}")
        elif key == "algo.T":
            target = "sampling.steps" if algo == "bd3lm" else "T"
            _note(f"algo.T={value} is read as {target}={value}.")
            out.append(f"{target}={value}")
        elif key == "sampling.first_hitting":
            predictor = "first_hitting" if value.lower() == "true" else "ddpm_cache"
            _note(f"{arg} is read as sampling.predictor={predictor}.")
            out.append(f"sampling.predictor={predictor}")
        elif key == "algo.var_min":
            if value.lower() == "false":
                out.append("training.clip_search_widths=[]")
            _note(f"{arg}: the clip search runs when training.clip_search_widths is set.")
        elif key == "algo.cross_attn":
            if algo == "bd3lm" and value.lower() == "false":
                raise UsageError("algo.cross_attn=False is not supported: block diffusion "
                                 "trains on x_t and x_0 side by side here; drop the key.")
            _note(f"{arg} is accepted for compatibility with the BD3-LM release; {_NO_EFFECT}.")
        elif key.startswith("+") and key[1:] in INSERT_KEYS:
            out.append(arg[1:])
        elif key in ALGO_NO_EFFECT:
            _note(f"{arg} is accepted for compatibility with the BD3-LM release; {_NO_EFFECT}.")
        else:
            out.append(arg)
    return out


def check_overrides(argv: list[str]) -> None:
    """Before Hydra runs: a misspelt key stops with the closest valid one; keys of the
    release that mean nothing here are accepted with a notice."""
    import difflib

    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    check_group_choices(args)
    try:
        parsed = OverridesParser.create().parse_overrides(args)
        choices = [a for a, o in zip(args, parsed) if o.key_or_group in GROUPS]
        with initialize_config_module(config_module="pretrain.config", version_base=None):
            cfg = compose(config_name="config", overrides=choices)
    except Exception:  # malformed overrides: Hydra's own message says what is wrong
        return
    known = _flat_keys(cfg)
    for o in parsed:
        key = o.key_or_group
        if key in GROUPS or key.startswith("hydra.") or o.is_delete():
            continue
        effect = RELEASE_ONLY.get(key)
        if key.startswith("wandb."):
            effect = ("with wandb installed the run also logs to Weights & Biases "
                      "(wandb.enabled=false: TensorBoard only)" if _wandb_installed() else
                      f"{_NO_EFFECT} (runs log to TensorBoard and metrics.jsonl)")
        if effect:
            _note(f"{key} is accepted for compatibility with the MDLM release; {effect}.")
            continue
        if o.is_add() or OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; see pretrain/config/config.yaml."
        raise UsageError(f"{key} is not a setting{hint}")


_MISSING = object()


def _wandb_installed() -> bool:  # wandb.* keys then log to W&B (pretrain.wandb_log)
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def check_group_choices(args: list[str]) -> None:
    """``noise=bogus`` and the like: a config group's choice that has no file."""
    from pathlib import Path

    root = Path(__file__).parent / "config"
    for arg in args:
        key, _, value = arg.lstrip("+~").partition("=")
        if key in GROUPS and value and not (root / key / f"{value}.yaml").is_file():
            options = sorted(p.stem for p in (root / key).glob("*.yaml"))
            raise UsageError(f"{key}={value} is not a choice; use one of {options}.")


@hydra.main(config_path="config", config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig):
    return dispatch(cfg)


def main():
    sys.argv[1:] = translate_algo(translate_lightning(sys.argv[1:]))
    check_overrides(sys.argv[1:])
    return _hydra_main()
