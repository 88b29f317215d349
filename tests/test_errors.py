"""Bad paths, files and parameters raise clear lmgen errors naming the file or parameter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import lmgen
from lmgen import CorruptFileError, ModelNotFoundError, UnsupportedModelError


def test_missing_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        lmgen.load(str(tmp_path / "no-such-folder"))
    with pytest.raises(ModelNotFoundError, match="nothing-here.gguf"):
        lmgen.load("./nothing-here.gguf")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        lmgen.load(tmp_path)


def test_folder_without_weights(tmp_path, tiny_gpt2_dir):
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(tiny_gpt2_dir / name, tmp_path / name)
    with pytest.raises(ModelNotFoundError, match="no weights found"):
        lmgen.load(tmp_path)


def test_unsupported_architecture_names_the_supported_ones(tmp_path, tiny_gpt2_dir):
    shutil.copytree(tiny_gpt2_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "bert"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"'bert'.*supported: gpt2, llama"):
        lmgen.load(tmp_path / "m")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, tiny_gpt2_dir, damage):
    folder = tmp_path / "m"
    shutil.copytree(tiny_gpt2_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x07not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="model.safetensors"):
        lmgen.load(folder)


def test_corrupt_pytorch_bin(tmp_path, tiny_gpt2_dir):
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(tiny_gpt2_dir / name, folder / name)
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(CorruptFileError, match="pytorch_model.bin"):
        lmgen.load(folder)


def test_weights_that_do_not_fit_the_config(tmp_path, tiny_gpt2_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_gpt2_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_layer"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptFileError, match=r"do not fit the gpt2 config.*transformer\.h\.2"):
        lmgen.load(folder)


def test_truncated_gguf(tmp_path, embedded_path):
    cut = tmp_path / "cut.gguf"
    with open(embedded_path, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    with pytest.raises(CorruptFileError, match=r"cut\.gguf.*truncated or corrupt"):
        lmgen.load(cut)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(CorruptFileError, match=r"bad\.gguf.*not a GGUF file"):
        lmgen.load(bad)


def test_bad_load_arguments(tiny_gpt2_dir):
    with pytest.raises(ValueError, match="dtype"):
        lmgen.load(tiny_gpt2_dir, dtype="float8")
    with pytest.raises(ValueError, match="device"):
        lmgen.load(tiny_gpt2_dir, device="warp-drive")


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_hub_id_offline_says_how_to_get_it(tmp_path):
    code = "import lmgen\ntry:\n  lmgen.load('someorg/not-cached')\nexcept lmgen.ModelNotFoundError as e:\n  print(e)"
    out = run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "'someorg/not-cached'" in out.stdout
    assert "huggingface-cli download someorg/not-cached" in out.stdout


def test_hub_id_from_the_local_cache(tmp_path, tiny_gpt2_dir):
    repo = tmp_path / "models--someorg--tiny-gpt2"
    shutil.copytree(tiny_gpt2_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    code = ("import lmgen\nlm = lmgen.load('someorg/tiny-gpt2')\n"
            "print(lm.generate([464, 2068], max_new_tokens=4)[0].token_ids)")
    out = run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    expected = lmgen.load(tiny_gpt2_dir).generate([464, 2068], max_new_tokens=4)[0].token_ids
    assert out.stdout.strip() == str(expected)


class TestBadGenerationParameters:
    @pytest.mark.parametrize("params, name", [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(num_return_sequences=0), "num_return_sequences"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(seed="abc"), "seed"),
    ])
    def test_value_error_names_the_parameter(self, tiny_gpt2, params, name):
        with pytest.raises(ValueError, match=name):
            tiny_gpt2.generate("hello", **params)

    def test_unknown_parameter(self, tiny_gpt2):
        with pytest.raises(TypeError, match="max_tokenz"):
            tiny_gpt2.generate("hello", max_tokenz=3)

    def test_token_ids_outside_the_vocabulary(self, tiny_gpt2):
        with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 50257\)"):
            tiny_gpt2.generate([464, 50257])
        with pytest.raises(ValueError, match="prompt token ids"):
            tiny_gpt2.next_token_probs([-1])

    def test_empty_prompt_without_bos(self, tiny_gpt2):
        from lmgen.lm import LM
        from lmgen.tokenizer import Tokenizer

        tok = tiny_gpt2.tokenizer
        no_bos = LM(tiny_gpt2.model, Tokenizer(tok.backend, bos_token_id=None, eos_token_ids=tok.eos_token_ids))
        with pytest.raises(ValueError, match="prompt is empty"):
            no_bos.generate("")
        # With a BOS token, an empty prompt starts from it, as transformers does.
        assert tiny_gpt2.generate("", max_new_tokens=2)[0].prompt_token_ids == [50256]

    def test_prompt_longer_than_the_context(self, tiny_gpt2):
        with pytest.raises(ValueError, match="context is 256"):
            tiny_gpt2.generate([464] * 300)


def test_hub_download_falls_back_to_pytorch_bin(tmp_path, monkeypatch, tiny_gpt2_dir):
    # A stand-in for the Hub: an online repo that has only pytorch_model.bin, not cached yet.
    import huggingface_hub

    from lmgen.weights import hf

    from .conftest import make_tiny_gpt2

    repo = make_tiny_gpt2(tmp_path / "repo", safetensors=False)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns, local_files_only=False):
        calls.append((local_files_only, "pytorch_model*.bin" in allow_patterns))
        if local_files_only:
            raise FileNotFoundError("not cached")
        out = tmp_path / f"snapshot{len(calls)}"
        out.mkdir()
        for f in repo.iterdir():
            if f.suffix != ".bin" or "pytorch_model*.bin" in allow_patterns:
                (out / f.name).write_bytes(f.read_bytes())
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    path = hf.hub_snapshot("someorg/bin-only")
    assert calls == [(True, False), (False, False), (False, True)]
    assert (path / "pytorch_model.bin").is_file()
