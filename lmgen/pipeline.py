"""pipeline("text-generation"): the one-call form of transformers' pipeline, on our models."""

from __future__ import annotations

from pathlib import Path

from .lm import LM

TASKS = ("text-generation",)


class TextGenerationPipeline:
    """Callable returning [{"generated_text": ...}, ...] like transformers' text-generation pipeline."""

    def __init__(self, lm: LM):
        self.lm = lm

    def __call__(self, text_inputs: str | list[str], *, return_full_text: bool = True,
                 do_sample: bool = True, **params) -> list:
        """Generate for one text (a list of dicts) or several (a list of lists); samples by default, like GPT-2."""
        texts = [text_inputs] if isinstance(text_inputs, str) else list(text_inputs)
        gens = self.lm.generate(texts, do_sample=do_sample, **params)
        n = len(gens) // len(texts)
        out = [[{"generated_text": (t if return_full_text else "") + g.text} for g in gens[i * n:(i + 1) * n]]
               for i, t in enumerate(texts)]
        return out[0] if isinstance(text_inputs, str) else out


def pipeline(task: str = "text-generation", model: LM | str | Path | None = None, **load_args):
    """A text-generation pipeline over `model` (an LM, a path or Hub id, or None for the embedded default)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not isinstance(model, LM):
        from .loading import load

        model = load(model, **load_args)
    return TextGenerationPipeline(model)
