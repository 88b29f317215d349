"""lm-evaluation-harness's `local-completions` model against `lmgen serve`, offline, tokenizer_backend left at its
default: a 20-question multiple-choice task (log-likelihoods) and a small generation task, from local files, behind
the API key (lm-eval sends model_args' auth_token to the tokenizer endpoints, $OPENAI_API_KEY to /v1/completions).

lm-eval runs in a subprocess (`python -m tests.test_lm_eval ...`, main() below): the offline switches are read
when `datasets` is imported, and simple_evaluate reseeds the global random generators.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .test_server import API_KEY, Server

ROOT = Path(__file__).resolve().parents[1]
MAX_GEN_TOKS = 12
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
# What LocalCompletionsAPI logs when /tokenizer_info and /tokenize answer (lm_eval/models/openai_completions.py).
REMOTE_CHOSEN = ("lm_eval.models.openai_completions",
                 "Auto-detected remote tokenizer support. Using remote tokenizer backend.")

QUESTIONS = [  # (question, choices, index of the right one)
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten"], 1),
    ("What colour is the sky on a clear day?", ["green", "blue", "red"], 1),
    ("Which planet is closest to the Sun?", ["Mercury", "Venus", "Mars", "Jupiter"], 0),
    ("What is two plus two?", ["three", "four", "five"], 1),
    ("Which animal says moo?", ["a cow", "a dog", "a cat"], 0),
    ("What is frozen water called?", ["steam", "ice", "sand"], 1),
    ("Who painted the Mona Lisa?", ["Leonardo da Vinci", "Pablo Picasso", "Claude Monet"], 0),
    ("What is the largest ocean on Earth?", ["the Atlantic", "the Indian Ocean", "the Pacific"], 2),
    ("How many days are there in a week?", ["five", "seven", "nine"], 1),
    ("What gas do plants take in?", ["oxygen", "carbon dioxide", "helium"], 1),
    ("Which is the tallest animal?", ["the giraffe", "the elephant", "the horse"], 0),
    ("What do bees make?", ["milk", "honey", "silk"], 1),
    ("In which country are the pyramids of Giza?", ["Egypt", "Mexico", "China"], 0),
    ("What is the boiling point of water in Celsius?", ["50 degrees", "100 degrees", "212 degrees"], 1),
    ("Which language is spoken in Brazil?", ["Spanish", "Portuguese", "French"], 1),
    ("How many continents are there?", ["five", "six", "seven"], 2),
    ("What is the opposite of hot?", ["cold", "warm", "loud"], 0),
    ("Which metal is liquid at room temperature?", ["iron", "mercury", "gold"], 1),
    ("What shape has three sides?", ["a square", "a circle", "a triangle"], 2),
]
GENERATE = ["Q: What is the capital of Italy?\nA:", "Q: Name a primary colour.\nA:", "Count: one, two, three,"]


def write_tasks(folder: Path) -> None:
    """The two tasks' data (jsonl) and YAML configs, which TaskManager(include_path=folder) loads."""
    folder.mkdir(parents=True, exist_ok=True)
    mc = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (folder / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": ""}) + "\n" for p in GENERATE))
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    (folder / "lmgen_mc.yaml").write_text(
        "task: lmgen_mc\n" + common.format(folder / "mc.jsonl") +
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    (folder / "lmgen_gen.yaml").write_text(
        "task: lmgen_gen\n" + common.format(folder / "gen.jsonl") +
        "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{answer}}"\n'
        f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {MAX_GEN_TOKS}\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")


def main(url: str, model: str, tasks_dir: str, out: str) -> None:
    """Run both tasks with local-completions (in the subprocess); write the samples, results and lm-eval's log."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    log: list[tuple[str, str]] = []

    class Keep(logging.Handler):
        def emit(self, record):
            log.append((record.name, record.getMessage()))

    logging.getLogger("lm_eval").addHandler(Keep(logging.INFO))
    logging.getLogger("lm_eval").setLevel(logging.INFO)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        # auth_token: the key for the tokenizer endpoints; /v1/completions gets $OPENAI_API_KEY.
        model_args=f"base_url={url}/v1/completions,model={model},auth_token={API_KEY},num_concurrent=1,"
                   "max_retries=1,max_length=512,timeout=120",
        tasks=["lmgen_mc", "lmgen_gen"], task_manager=TaskManager(include_path=tasks_dir, include_defaults=False),
        log_samples=True)
    Path(out).write_text(json.dumps({"samples": results["samples"], "results": results["results"], "log": log},
                                    default=str))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split (TemplateLM._encode_pair): trailing spaces move to the continuation; whole minus context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids):]


@pytest.fixture(scope="module")
def harness(tmp_path_factory, embedded_path) -> dict:
    pytest.importorskip("lm_eval")
    tmp = tmp_path_factory.mktemp("lm-eval")
    write_tasks(tmp / "tasks")
    server = Server(tmp, "--max-model-len", "512", api_key=API_KEY)
    try:
        model_id = httpx.get(server.url + "/v1/models", headers=server.headers, timeout=10).json()["data"][0]["id"]
        # HF_HOME: nothing from (or into) the user's caches.
        env = dict(os.environ, **OFFLINE, HF_HOME=str(tmp / "hf"), OPENAI_API_KEY=API_KEY)
        out = tmp / "out.json"
        run = subprocess.run([sys.executable, "-m", "tests.test_lm_eval", server.url, model_id, str(tmp / "tasks"),
                              str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"lm-eval failed:\n{run.stderr[-6000:]}\nserver log:\n{server.log()}"
        result = json.loads(out.read_text())
        result["log"] = [tuple(entry) for entry in result["log"]]
        return result
    finally:
        server.stop()


def test_lm_eval_picks_the_server_tokenizer(harness):
    assert REMOTE_CHOSEN in harness["log"]
    assert ("lm_eval.models.api_models", "Using tokenizer remote") in harness["log"]


def test_multiple_choice_loglikelihoods_match_the_model(harness, smollm_default):
    samples = sorted(harness["samples"]["lmgen_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(QUESTIONS)
    right = 0
    for sample, (question, choices, answer) in zip(samples, QUESTIONS):
        assert len(sample["arguments"]) == len(sample["filtered_resps"]) == len(choices)
        expected = []
        for (context, continuation), (got, got_greedy) in zip(sample["arguments"], sample["filtered_resps"]):
            assert context == f"Question: {question}\nAnswer:"
            context_ids, continuation_ids = encode_pair(smollm_default.tokenizer, context, continuation)
            steps = smollm_default.prompt_logprobs(context_ids + continuation_ids, top_n=1)[len(context_ids):]
            total = sum(s.logprob for s in steps)
            assert got == pytest.approx(total, abs=1e-4), (context, continuation)
            # lm-eval's is_greedy: every continuation token is the top one (top_logprobs must hold it).
            assert got_greedy == all(s.top[0][0] == s.token_id for s in steps), (context, continuation)
            expected.append(total)
        right += max(range(len(expected)), key=expected.__getitem__) == answer
    assert harness["results"]["lmgen_mc"]["acc,none"] == pytest.approx(right / len(QUESTIONS))


def test_generations_match_greedy_decoding(harness, smollm_default):
    samples = sorted(harness["samples"]["lmgen_gen"], key=lambda s: s["doc_id"])
    assert [s["arguments"][0][0] for s in samples] == GENERATE
    eos = smollm_default.tokenizer.decode([smollm_default.eos_token_ids[0]])
    for sample, prompt in zip(samples, GENERATE):
        ids = smollm_default.tokenizer.encode(prompt, add_special_tokens=False)  # as lm-eval sent it: token ids
        alone = smollm_default.generate(ids, max_new_tokens=MAX_GEN_TOKS, stop=["\n", eos])[0]
        assert sample["filtered_resps"][0] == alone.text


if __name__ == "__main__":
    main(*sys.argv[1:])
