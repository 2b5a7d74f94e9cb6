"""Result tables: the zero-shot perplexities as a markdown table in the paper's shape."""

from __future__ import annotations

ZERO_SHOT = ["ptb", "wikitext2", "lm1b", "lambada", "ag_news", "scientific_papers_pubmed",
             "scientific_papers_arxiv", "wikitext103"]
LABELS = {"ptb": "PTB", "wikitext2": "Wikitext2", "wikitext103": "Wikitext103",
          "lm1b": "LM1B", "lambada": "Lambada", "ag_news": "AG News",
          "scientific_papers_pubmed": "Pubmed", "scientific_papers_arxiv": "Arxiv"}


def zero_shot_markdown(results: dict, model_name: str) -> str:
    """One row for the model, one column per dataset: 'PPL ± stderr-in-PPL' (upper bound
    marked with <= for diffusion models, as the paper does)."""
    names = list(results)
    header = "| Model | " + " | ".join(LABELS.get(n, n) for n in names) + " |"
    rule = "|---|" + "---|" * len(names)
    cells = []
    for n in names:
        r = results[n]
        # the PPL's standard error by the delta method: ppl x stderr(nll)
        bound = "" if r.get("exact") else "≤"
        cells.append(f"{bound}{r['ppl']:.2f} ± {r['ppl'] * r['stderr']:.2f}")
    return "\n".join([header, rule, f"| {model_name} | " + " | ".join(cells) + " |"]) + "\n"
