"""The lmgen command line, run as a subprocess: each subcommand, JSON output, chat through stdin, bad inputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from .conftest import SEED_PROMPT


def lmgen_cli(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "lmgen", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_generate_streams_the_continuation(tiny_gpt2_dir, tiny_gpt2):
    out = lmgen_cli("generate", SEED_PROMPT, "--model", str(tiny_gpt2_dir), "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    expected = tiny_gpt2.generate(SEED_PROMPT, max_new_tokens=8)[0].text
    assert out.stdout == SEED_PROMPT + expected + "\n"


def test_generate_json_agrees_with_the_api_for_the_same_seed(tiny_gpt2_dir, tiny_gpt2):
    args = ["--model", str(tiny_gpt2_dir), "--max-new-tokens", "10", "--sample", "--seed", "5", "--top-k", "50",
            "-n", "2", "--logprobs", "3", "--json"]
    out = lmgen_cli("generate", SEED_PROMPT, *args)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    api = tiny_gpt2.generate(SEED_PROMPT, max_new_tokens=10, do_sample=True, seed=5, top_k=50,
                             num_return_sequences=2, logprobs=3)
    assert [g["token_ids"] for g in data["generations"]] == [g.token_ids for g in api]
    assert [g["text"] for g in data["generations"]] == [g.text for g in api]
    assert data["generations"][0]["finish_reason"] == "length"
    assert len(data["generations"][1]["logprobs"]) == 10 and len(data["generations"][1]["logprobs"][0]["top"]) == 3
    # --stream: JSON lines, one per token, the last carrying the whole generation; the same tokens.
    lines = lmgen_cli("generate", SEED_PROMPT, *args, "--stream").stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["token_id"] for e in events if e["index"] == 1] == api[1].token_ids
    assert events[-1]["generation"]["text"] == api[1].text
    assert "".join(e["text"] for e in events if e["index"] == 0) == api[0].text


def test_generate_reads_the_prompt_from_stdin_and_labels_sequences(tiny_gpt2_dir):
    out = lmgen_cli("generate", "-", "--model", str(tiny_gpt2_dir), "--max-new-tokens", "4", "-n", "2",
                    "--sample", "--seed", "1", stdin=SEED_PROMPT)
    assert out.returncode == 0, out.stderr
    assert "--- sequence 1 of 2 ---" in out.stdout and "--- sequence 2 of 2 ---" in out.stdout
    assert out.stdout.count(SEED_PROMPT) == 2


def test_probs_table_json_and_plot(tiny_gpt2_dir, tiny_gpt2, tmp_path):
    top = tiny_gpt2.top_tokens(SEED_PROMPT, k=5)
    out = lmgen_cli("probs", SEED_PROMPT, "--model", str(tiny_gpt2_dir), "--top", "5", "--json")
    data = json.loads(out.stdout)
    assert [t["id"] for t in data["tokens"]] == [t.token_id for t in top]
    assert abs(data["tokens"][0]["probability"] - top[0].probability) < 1e-6
    png = tmp_path / "bars.png"
    table = lmgen_cli("probs", SEED_PROMPT, "--model", str(tiny_gpt2_dir), "--top", "5", "--plot", str(png))
    assert table.returncode == 0, table.stderr
    assert str(top[0].token_id) in table.stdout and f"{top[0].probability:.4f}" in table.stdout
    from PIL import Image

    with Image.open(png) as image:
        assert image.size[0] > 100 and image.size[1] > 100
        low, high = image.convert("L").getextrema()
        assert high - low > 100  # drawn, not blank


def test_score_prints_logprobs_and_perplexity(tiny_gpt2_dir, tiny_gpt2):
    text = "The quick brown fox jumped over the lazy dog"
    out = lmgen_cli("score", text, "--model", str(tiny_gpt2_dir), "--json")
    data = json.loads(out.stdout)
    s = tiny_gpt2.score(text)
    assert abs(data["perplexity"] - s.perplexity) / s.perplexity < 1e-6
    assert data["logprobs"][0] is None and len(data["logprobs"]) == len(s.token_ids)
    assert data["ranks"][1:] == [e.rank for e in s.tokens] and data["entropies"][0] is None
    assert data["entropies"][1:] == [e.entropy for e in s.tokens]
    plain = lmgen_cli("score", "--file", "/dev/stdin", "--model", str(tiny_gpt2_dir), stdin=text)
    assert plain.returncode == 0 and f"perplexity {s.perplexity:.4f}" in plain.stdout


def test_chat_two_turns_through_stdin(smollm_default):
    turns = ["My name is Zorblax. Say hello to me.", "What is my name?"]
    out = lmgen_cli("chat", "--max-new-tokens", "16", stdin="\n".join(turns) + "\n/quit\n")
    assert out.returncode == 0, out.stderr
    history, expected = [], ""
    for turn in turns:  # the second reply is generated from a prompt holding the first exchange
        history.append({"role": "user", "content": turn})
        template = smollm_default.tokenizer.apply_chat_template(history)
        ids = smollm_default.tokenizer.encode(template, add_special_tokens=False)
        reply = smollm_default.generate(ids, max_new_tokens=16)[0].text
        history.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert out.stdout == expected
    once = lmgen_cli("chat", "--message", turns[0], "--max-new-tokens", "16")
    assert once.stdout == history[1]["content"] + "\n"


def test_models_and_info(tiny_gpt2_dir):
    out = lmgen_cli("models", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)[0]["source"] == "embedded"
    info = json.loads(lmgen_cli("info", str(tiny_gpt2_dir), "--json").stdout)
    assert info["architecture"] == "gpt2" and info["vocab_size"] == 50257 and info["context_length"] == 256
    assert info["chat_template"] is False
    assert info["parameters"] == 50257 * 64 + 256 * 64 + 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64
    assert info["attention"] == "full on every layer"


def test_info_names_sliding_window_layers(tiny_gemma3_dir):
    info = json.loads(lmgen_cli("info", str(tiny_gemma3_dir), "--json").stdout)
    assert info["architecture"] == "gemma3"
    assert info["attention"].startswith("sliding window 8 on 2 of 3 layers")
    assert "prefix caching holds" in info["attention"]


@pytest.mark.parametrize("args, code, message", [
    (["generate", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["generate", "hi", "--top-p", "2"], 2, "--top-p must be"),
    (["generate", "hi", "--max-new-tokens", "-1"], 2, "--max-new-tokens must be"),
    (["generate", ""], 2, "prompt is empty"),
    (["generate", "hi", "--model", "./no/such/model"], 1, "does not exist"),
    (["probs", "hi", "--top", "0"], 2, "--top must be >= 1"),
    (["generate", "hi", "--temperature", "warm"], 2, "invalid float value"),
    (["serve", "--prefill-chunk", "0"], 2, "--prefill-chunk must be >= 1"),
    (["generate", "hi", "--regex", "("], 2, "--regex is invalid: at 1(8): invalid regex"),
    (["generate", "hi", "--grammar", "/no/such.gbnf"], 2, "--grammar: cannot read /no/such.gbnf"),
    (["generate", "hi", "--json-schema", "/no/such.json"], 2, "--json-schema: cannot read /no/such.json"),
    (["generate", "hi", "--regex", "a", "--choice", "b"], 2, "not allowed with argument"),
    (["chat", "--message", "hi", "--choice", ""], 2, "--choice must be"),
])
def test_bad_inputs_get_one_line_and_an_exit_code(args, code, message):
    out = lmgen_cli(*args)
    assert out.returncode == code
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_constraint_flags(tiny_gpt2_dir, tmp_path):
    model = ["--model", str(tiny_gpt2_dir), "--max-new-tokens", "20"]
    out = lmgen_cli("generate", "Pick:", *model, "--choice", "yes", "--choice", "no")
    assert out.returncode == 0 and out.stdout in ("Pick:yes\n", "Pick:no\n"), out.stderr
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    out = lmgen_cli("generate", "Answer:", *model, "--json-schema", str(schema), "--json")
    generation = json.loads(out.stdout)["generations"][0]
    assert generation["finish_reason"] == "stop" and json.loads(generation["text"]) in ({"ok": True}, {"ok": False})
    grammar = tmp_path / "digits.gbnf"
    grammar.write_text('root ::= "n=" [0-9] [0-9]\n')
    out = lmgen_cli("generate", "Number:", *model, "--grammar", str(grammar))
    assert out.returncode == 0 and re.fullmatch(r"Number:n=[0-9]{2}\n", out.stdout), out.stdout
    schema.write_text("{not json")
    out = lmgen_cli("generate", "x", *model, "--json-schema", str(schema))
    assert out.returncode == 2 and "is not JSON" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_info_names_the_default_path_of_the_embedded_model(smollm):
    info = json.loads(lmgen_cli("info", "--json").stdout)
    assert info["weights"].startswith("int4 kernels on the file's own Q4_1 blocks")
    unique = {p.data_ptr(): p.numel() for p in smollm.model.parameters()}  # the float32 model, tied once
    assert info["parameters"] == sum(unique.values())  # quantized layers count by their shape
    assert smollm.weights == "float32, dequantized from the file"
