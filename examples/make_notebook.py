"""Write examples/language-generation.ipynb (without outputs) from the cells below: `python examples/make_notebook.py`.

The notebook redoes the seed notebook's steps with lmgen on the embedded model, then shows lmgen's own views. Edit
the cells here and run this again, so the notebook and its source never drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path

NOTEBOOK = Path(__file__).with_name("language-generation.ipynb")

CELLS = [
    ("markdown", """\
# Language generation with lmgen

When it predicts the next token, a GPT-style model gives a score to every token of its vocabulary. We can turn those
scores into probabilities and use them to generate text: take the most likely token each time, or draw one by its
probability. This notebook walks through both with lmgen, offline, on its embedded model (SmolLM2-135M-Instruct),
then looks at what the sampling parameters do to the distribution and how surprised the model is by a text.

Importing lmgen in a notebook registers rich displays: next-token tables, generations and scores show as HTML."""),
    ("code", """\
import random

import torch

import lmgen

lm = lmgen.load()  # the embedded SmolLM2-135M-Instruct: no network needed
print(lm.name, "|", lm.weights)"""),
    ("markdown", "Let's say that we want to generate more text after this sequence:"),
    ("code", 'text = "The quick brown fox jumped over"'),
    ("markdown", """\
## Tokens

The tokenizer splits the text into tokens and gives each one its id in the vocabulary. The seed notebook used
distilgpt2, whose tokenizer is GPT-2's: lmgen ships that one too, so we can see its ids. Our model has its own
vocabulary, so the same text gets other ids, and those are the ones we feed it."""),
    ("code", """\
gpt2_ids = lmgen.load_tokenizer("gpt2").encode(text)
print("GPT-2's ids:", gpt2_ids)

input_ids = lm.tokenizer.encode(text)
print("the model's ids:", input_ids)"""),
    ("markdown", "`decode` turns ids back into text, which we need once we have generated more ids:"),
    ("code", "lm.tokenizer.decode(input_ids)"),
    ("markdown", """\
## The next-token distribution

The model gives one score (logit) per vocabulary entry for the token after the last one; a softmax turns the scores
into probabilities that sum to 1. `lm.next_token_probs(input_ids)` does both steps."""),
    ("code", """\
logits = lm.next_token_logits(input_ids)
next_token_probs = torch.softmax(logits, dim=-1)
next_token_probs.shape, float(next_token_probs.sum())"""),
    ("markdown", "The most likely token is the argmax, and `decode` says what it is:"),
    ("code", """\
next_token_id = int(next_token_probs.argmax())
next_token_id, lm.tokenizer.decode([next_token_id])"""),
    ("markdown", """\
`lm.top_tokens` lists the most likely tokens with their probabilities; in a notebook it shows as a table
(␣ is a space, ↵ a newline)."""),
    ("code", "lm.top_tokens(input_ids, k=10)"),
    ("markdown", """\
## Greedy decoding

Append the most likely token, run the model again on the longer sequence, and repeat: eight times here. This is the
seed notebook's loop, running the whole sequence through the model at every step."""),
    ("code", """\
def greedy_ids(ids, n=8):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(lm.next_token_probs(ids).argmax()))
    return ids


greedy_generated = greedy_ids(input_ids)
lm.tokenizer.decode(greedy_generated)"""),
    ("markdown", """\
`lm.generate` does the same (greedy is its default) without recomputing the prompt at every step: it keeps each
token's keys and values in a cache. The tokens are the same."""),
    ("code", """\
greedy = lm.generate(input_ids, max_new_tokens=8)[0]
print(repr(greedy.text))
input_ids + greedy.token_ids == greedy_generated"""),
    ("markdown", """\
## Forcing a token

We can also choose a token ourselves, append it, and let the model continue. The seed notebook appended " top".
Token ids belong to a vocabulary: GPT-2's id for " top" is another token in this model's vocabulary, so we ask our
tokenizer for the id."""),
    ("code", """\
top_ids = lm.tokenizer.encode(" top")
print('" top" is', top_ids)

forced = lm.generate(input_ids + top_ids, max_new_tokens=8)[0]
lm.tokenizer.decode(input_ids + top_ids + forced.token_ids)"""),
    ("markdown", """\
## Sampling

Always taking the most likely token often makes dull text. Sampling draws the next token at random instead, using
the probabilities as weights, so likely tokens are chosen more often. On a tiny vocabulary of four tokens:"""),
    ("code", """\
toy_probs = [0.1, 0.2, 0.4, 0.3]
indices = list(range(len(toy_probs)))
draw = random.Random(0)
print("unweighted:", [draw.choices(indices, k=1)[0] for _ in range(10)])
print("weighted:  ", [draw.choices(indices, k=1, weights=toy_probs)[0] for _ in range(10)])"""),
    ("markdown", """\
`do_sample=True` draws each token by its probability; `weighted=False` draws uniformly from the whole vocabulary,
which shows why the weights matter. A `seed` makes a draw reproducible; change it (or leave it out) for another."""),
    ("code", """\
for weighted in (True, False):
    for prompt in (input_ids, input_ids + top_ids):
        out = lm.generate(prompt, do_sample=True, weighted=weighted, max_new_tokens=8, seed=0)[0]
        print(f"{'weighted' if weighted else 'unweighted':>10}: {lm.tokenizer.decode(prompt + out.token_ids)!r}")"""),
    ("markdown", """\
## A pipeline

lmgen has the same one-call form as Hugging Face's `text-generation` pipeline, which samples by default: here 30 new
tokens and 5 different generations (`lm.generate(text, do_sample=True, num_return_sequences=5)` is the same)."""),
    ("code", """\
generator = lmgen.pipeline("text-generation", model=lm)
for out in generator(text, max_new_tokens=30, num_return_sequences=5, seed=1):
    print(repr(out["generated_text"]))"""),
    ("markdown", """\
## What the sampling parameters do

`lm.distribution` shows the next-token distribution before and after the sampling parameters, as generation
processes it: the model's probabilities, the ones sampling draws from, and which stage removed a token. With no
parameters they are the same:"""),
    ("code", "lm.distribution(input_ids)"),
    ("markdown", """\
A temperature below 1 sharpens the distribution (and above 1 flattens it); `top_k` keeps only the k most likely
tokens:"""),
    ("code", "lm.distribution(input_ids, temperature=0.7, top_k=5)"),
    ("markdown", """\
`top_p` (nucleus sampling) keeps the most likely tokens until their mass reaches p; `min_p` drops tokens less likely
than min_p times the most likely one:"""),
    ("code", "lm.distribution(input_ids, top_p=0.9)"),
    ("code", "lm.distribution(input_ids, min_p=0.05)"),
    ("markdown", """\
## How sure was the model?

With `logprobs=5`, each generated token carries its log-probability and the five most likely tokens at its step. The
generation then shows each token coloured by its probability; hover over a token to see its alternatives."""),
    ("code", "lm.generate(input_ids, do_sample=True, max_new_tokens=24, seed=2, logprobs=5)[0]"),
    ("markdown", """\
`lm.score` reads a whole text and scores each token given the ones before it: the X-ray colours each token by its
surprisal (-logprob, in nats), and the perplexity sums the text up. Hover over a token for its rank, probability and
the model's alternatives. An expected ending is cheap; an odd one is not:"""),
    ("code", 'lm.score(text + " the lazy dog.")'),
    ("code", 'lm.score(text + " the lazy cucumber.")'),
    ("markdown", """\
## The token explorer

`lm.explore()` serves the token explorer (the page `lmgen serve` serves) on this model from a background thread and
shows it here in a frame: click a bar to append that token, or generate with any parameters. Stop it when done:

```python
explorer = lm.explore()
explorer  # the page, in a frame
...
explorer.stop()
```"""),
]


def notebook() -> dict:
    """The notebook as nbformat 4.5 JSON, without outputs, its cells' ids numbered."""
    cells = []
    for number, (kind, source) in enumerate(CELLS, 1):
        cell = {"cell_type": kind, "id": f"cell-{number:02d}", "metadata": {}, "source": source.splitlines(True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    metadata = {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
                "language_info": {"name": "python"}}
    return {"cells": cells, "metadata": metadata, "nbformat": 4, "nbformat_minor": 5}


if __name__ == "__main__":
    NOTEBOOK.write_text(json.dumps(notebook(), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {NOTEBOOK}")
