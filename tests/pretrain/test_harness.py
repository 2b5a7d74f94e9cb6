"""The LM Evaluation Harness model ``mdlm`` on a local task (a YAML over a JSON file):
AR log-likelihoods equal a direct computation, MDLM ones lie within Monte Carlo error of the
model's own conditional bound; rolling perplexity and generation run through the harness."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from model import Diffusion, ModelConfig, save_pretrained, tokenizer_ids  # noqa: E402
from pretrain.data.tokenizers import get_tokenizer  # noqa: E402
from tests.conftest import randomize_  # noqa: E402
from tests.pretrain.test_tokenizers import gpt2_style_dir  # noqa: E402

DOCS = [{"context": "hello world, the", "continuation": " quick brown fox"},
        {"context": "the quick", "continuation": " brown fox, hello"},
        {"context": "", "continuation": "hello world"}]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
"""
LOGLIKELIHOOD = TASK + """metric_list:
  - metric: acc
"""
ROLLING = TASK.replace('doc_to_text: "{{{{context}}}}"\n', 'doc_to_text: ""\n').replace(
    "{{{{continuation}}}}", "{{{{context}}}}{{{{continuation}}}}") + """metric_list:
  - metric: word_perplexity
"""
GENERATE = TASK + """generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    tok_dir = gpt2_style_dir(root)
    ids = tokenizer_ids(get_tokenizer(str(tok_dir)))
    models = {}
    for name, changes in (("mdlm", {}), ("ar", dict(backbone="ar", parameterization="ar"))):
        torch.manual_seed(0)
        model = Diffusion(ModelConfig(vocab_size=ids["vocab_size"], mask_index=ids["mask_index"],
                                      length=32, hidden_size=32, cond_dim=16, n_blocks=1,
                                      n_heads=2, **changes))
        models[name] = save_pretrained(randomize_(model, std=0.1), root / name)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, kind, text in (("tiny_ll", "loglikelihood", LOGLIKELIHOOD),
                             ("tiny_rolling", "loglikelihood_rolling", ROLLING),
                             ("tiny_gen", "generate_until", GENERATE)):
        (tasks / f"{name}.yaml").write_text(text.format(name=name, data=data, kind=kind))
    return {"tok": str(tok_dir), "models": models, "tasks": str(tasks)}


TASKS = ["tiny_ll", "tiny_rolling", "tiny_gen"]
DRAWS = 64


@pytest.fixture(scope="module")
def results(setup):
    """Each family through lm_eval once, on the three local tasks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import pretrain.harness  # noqa: F401  (registers the model)

    manager = TaskManager(include_path=setup["tasks"], include_defaults=False)
    out = {}
    for family in ("ar", "mdlm"):
        model_args = ",".join(f"{k}={v}" for k, v in dict(
            pretrained=setup["models"][family], tokenizer=setup["tok"], device="cpu",
            mc_samples=DRAWS, seed=1, steps=8).items())
        out[family] = lm_eval.simple_evaluate(model="mdlm", model_args=model_args,
                                              tasks=TASKS, task_manager=manager,
                                              log_samples=True)
    return out


def responses(out, task: str) -> list:
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [s["resps"][0][0] for s in samples]


def test_ar_loglikelihoods_equal_a_direct_computation(setup, results):
    from pretrain.harness import MDLMHarness

    got = responses(results["ar"], "tiny_ll")
    harness = MDLMHarness(setup["models"]["ar"], tokenizer=setup["tok"], device="cpu")
    model = harness.model
    for doc, (logprob, greedy) in zip(DOCS, got):
        context, continuation = harness.encode_pair(doc["context"], doc["continuation"])
        x = torch.tensor([context + continuation])
        loss = model.loss(x)  # the training objective's per-token next-token NLLs
        direct = -float(loss.nlls[0, -len(continuation):].double().sum())
        assert float(logprob) == pytest.approx(direct, abs=1e-4)
        assert isinstance(greedy, bool)


def test_mdlm_loglikelihoods_lie_within_monte_carlo_error_of_the_bound(setup, results):
    from pretrain.harness import MDLMHarness

    draws = DRAWS
    got = responses(results["mdlm"], "tiny_ll")
    harness = MDLMHarness(setup["models"]["mdlm"], tokenizer=setup["tok"], device="cpu")
    model = harness.model
    generator = torch.Generator().manual_seed(12345)
    for doc, (logprob, _) in zip(DOCS, got):
        context, continuation = harness.encode_pair(doc["context"], doc["continuation"])
        x0 = torch.tensor([context + continuation]).expand(500, -1)
        keep = torch.zeros_like(x0, dtype=torch.bool)
        keep[:, : len(context)] = True
        with torch.no_grad():  # the model's own conditional bound, 2000 draws
            per_draw = torch.cat([model.masked_losses(x0, (~keep).long(), generator=generator,
                                                      keep=keep)[1].double().sum(-1)
                                  for _ in range(4)])
        bound, spread = float(per_draw.mean()), float(per_draw.std())
        assert abs(-float(logprob) - bound) < 4 * spread / math.sqrt(draws) + 4 * spread / \
            math.sqrt(2000), (float(logprob), bound, spread)
        assert float(logprob) < 0


@pytest.mark.parametrize("family", ["ar", "mdlm"])
def test_rolling_and_generation_run(setup, results, family):
    rolled = responses(results[family], "tiny_rolling")
    assert len(rolled) == 3 and all(float(v) < 0 for v in rolled)
    if family == "ar":  # exact: the whole text's NLL from its BOS
        from pretrain.harness import MDLMHarness

        harness = MDLMHarness(setup["models"]["ar"], tokenizer=setup["tok"], device="cpu")
        text = DOCS[0]["context"] + DOCS[0]["continuation"]
        ids = [harness.bos] + harness.encode(text)
        direct = -float(harness.model.loss(torch.tensor([ids])).nlls.double().sum())
        assert float(rolled[0]) == pytest.approx(direct, abs=1e-4)
    generated = responses(results[family], "tiny_gen")
    assert len(generated) == 3 and all(isinstance(g, str) and "\n" not in g for g in generated)


@pytest.mark.slow
def test_the_command_line(setup, tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "pretrain.harness", "--model", "mdlm", "--model_args",
         f"pretrained={setup['models']['ar']},tokenizer={setup['tok']}", "--device", "cpu",
         "--tasks", "tiny_ll", "--include_path", setup["tasks"], "--output_path",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny_ll" in done.stdout and "acc" in done.stdout
