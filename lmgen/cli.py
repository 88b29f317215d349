"""The `lmgen` command line: generate text, streaming to the terminal."""

from __future__ import annotations

import argparse
import sys

from .errors import LmgenError, ModelNotFoundError

SEED_PROMPT = "The quick brown fox jumped over"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, never a usage dump or traceback
        sys.stderr.write(f"lmgen: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = _Parser(prog="lmgen", description="Generate text with causal language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="continue a prompt, streaming the text")
    gen.add_argument("prompt", nargs="?", default=SEED_PROMPT, help="the text to continue ('-' reads stdin)")
    gen.add_argument("--model", default=None,
                     help="model folder, .gguf file or Hub id (default: embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--sample", dest="do_sample", action="store_true", help="sample by the probabilities")
    mode.add_argument("--greedy", dest="do_sample", action="store_false",
                      help="always take the most likely token (default)")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("-n", "--num-return-sequences", type=int, default=1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    gen.add_argument("--device", default=None, help="cpu, cuda, ...")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 model not found, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return _generate(args)
    except ModelNotFoundError as e:
        sys.stderr.write(f"lmgen: {e}\n")
        return 1
    except (LmgenError, ValueError) as e:
        sys.stderr.write(f"lmgen: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130


def _generate(args) -> int:
    from .loading import load

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    from .params import GenerationConfig

    GenerationConfig(num_return_sequences=args.num_return_sequences, **params)  # bad values fail before loading
    lm = load(args.model, dtype=args.dtype, device=args.device)
    for i in range(args.num_return_sequences):
        if args.num_return_sequences > 1:
            sys.stdout.write(f"--- sequence {i + 1} ---\n")
        seed = None if args.seed is None else args.seed + i  # as generate(num_return_sequences=n) seeds them
        sys.stdout.write(prompt)
        for piece in lm.stream(prompt, **{**params, "seed": seed}):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
