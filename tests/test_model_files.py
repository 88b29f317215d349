"""Model files lmgen must read, or refuse with an error naming the file: config.json keys, GGUF versions, and
pytorch_model.bin in both of torch's formats (never unpickling anything but tensors)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import lmgen
from lmgen.cli import main
from lmgen.errors import ConfigError, CorruptFileError, UnsupportedModelError
from lmgen.weights.gguf_format import UnsupportedGGUFVersion, read_gguf

from .conftest import SEED_IDS

DELETE = object()  # as a config value: remove the key


def edited_copy(src: Path, dest: Path, **changes) -> Path:
    """A copy of a model folder whose config.json has `changes` (DELETE removes a key)."""
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    for key, value in changes.items():
        if value is DELETE:
            del config[key]
        else:
            config[key] = value
    (dest / "config.json").write_text(json.dumps(config))
    return dest


# --- config.json: a missing or mistyped key is a ConfigError naming the file and the key -------------------------

BAD_CONFIGS = [
    ("tiny_llama_dir", "hidden_size", DELETE, "is missing"),
    ("tiny_llama_dir", "hidden_size", "64", "must be an integer, got '64'"),
    ("tiny_llama_dir", "num_attention_heads", None, "is missing"),
    ("tiny_llama_dir", "rms_norm_eps", "1e-5", "must be a number"),
    ("tiny_llama_dir", "tie_word_embeddings", 0, "must be true or false"),
    ("tiny_gpt2_dir", "n_embd", DELETE, "is missing"),
    ("tiny_gpt2_dir", "n_head", True, "must be an integer, got True"),  # JSON true is no int
    ("tiny_gpt2_dir", "activation_function", ["gelu"], "must be a string"),
]


@pytest.mark.parametrize("model, key, value, problem", BAD_CONFIGS)
def test_bad_config_key_is_named_with_its_file(request, tmp_path, model, key, value, problem):
    folder = edited_copy(request.getfixturevalue(model), tmp_path / "m", **{key: value})
    with pytest.raises(ConfigError) as e:
        lmgen.load(folder)
    assert isinstance(e.value, CorruptFileError)
    assert e.value.path == folder / "config.json" and e.value.key == key
    assert str(folder / "config.json") in str(e.value) and f"'{key}' {problem}" in str(e.value)


def test_a_missing_rope_scaling_factor_is_named_where_it_is(tmp_path, tiny_llama_dir):
    folder = edited_copy(tiny_llama_dir, tmp_path / "m", rope_parameters={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ConfigError, match=r"config\.json: key 'rope_parameters\.low_freq_factor' is missing"):
        lmgen.load(folder)


def test_an_integer_where_a_float_is_expected_loads(tmp_path, tiny_gpt2_dir, tiny_gpt2):
    folder = edited_copy(tiny_gpt2_dir, tmp_path / "m", layer_norm_epsilon=0)
    assert lmgen.load(folder).model.config.layer_norm_epsilon == 0.0


def test_a_config_that_is_not_an_object(tmp_path, tiny_gpt2_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_gpt2_dir, folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CorruptFileError, match=r"config\.json: expected a JSON object, found list") as e:
        lmgen.load(folder)
    assert e.value.path == folder / "config.json"


@pytest.mark.parametrize("command", ["info", "generate"])
@pytest.mark.parametrize("model, key, value", [("tiny_llama_dir", "hidden_size", DELETE),
                                               ("tiny_gpt2_dir", "n_layer", "2")])
def test_cli_reports_a_bad_config_in_one_line(request, tmp_path, capsys, command, model, key, value):
    folder = edited_copy(request.getfixturevalue(model), tmp_path / "m", **{key: value})
    argv = ["info", str(folder)] if command == "info" else ["generate", "--model", str(folder), "-q", "hi"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmgen: error: ")
    assert str(folder / "config.json") in lines[0] and f"'{key}'" in lines[0]


# --- GGUF metadata goes through the same checks, named by the .gguf and its own key -------------------------------


def test_gguf_missing_metadata_names_the_gguf_key(tmp_path, monkeypatch, tiny_llama_dir):
    from .test_gguf import write_gguf

    monkeypatch.setattr(gguf.GGUFWriter, "add_embedding_length", lambda self, n: None)
    path = tmp_path / "m.gguf"
    write_gguf(tiny_llama_dir, path)
    with pytest.raises(ConfigError) as e:
        lmgen.load(path)
    assert e.value.path == path and e.value.key == "llama.embedding_length"
    assert f"{path}: key 'llama.embedding_length' is missing" in str(e.value)


def test_gguf_mistyped_metadata_names_the_gguf_key(tmp_path, monkeypatch, tiny_llama_dir):
    from .test_gguf import write_gguf

    key = gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch="llama")
    monkeypatch.setattr(gguf.GGUFWriter, "add_layer_norm_rms_eps", lambda self, v: self.add_string(key, str(v)))
    path = tmp_path / "m.gguf"
    write_gguf(tiny_llama_dir, path)
    with pytest.raises(ConfigError, match=rf"m\.gguf: key '{key}' must be a number, got '1e-05'") as e:
        lmgen.load(path)
    assert e.value.path == path and e.value.key == key


# --- GGUF versions: only 2 and 3 are read ------------------------------------------------------------------------


def tiny_gguf(path: Path, version: int) -> Path:
    """A minimal GGUF (one tensor, no tokenizer) with its header's version field set to `version`."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = bytearray(path.read_bytes())
    assert data[:4] == b"GGUF"
    data[4:8] = struct.pack("<I", version)  # the version follows the magic
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("version", [2, 3])
def test_gguf_versions_2_and_3_parse(tmp_path, version):
    metadata, tensors = read_gguf(tiny_gguf(tmp_path / "m.gguf", version))
    assert metadata["llama.block_count"] == 1 and tensors[0].name == "token_embd.weight"


@pytest.mark.parametrize("version", [0, 1, 4, 99])
def test_other_gguf_versions_are_refused(tmp_path, version):
    path = tiny_gguf(tmp_path / "future.gguf", version)
    with pytest.raises(UnsupportedGGUFVersion, match=f"GGUF version {version} is not supported"):
        read_gguf(path)
    with pytest.raises(UnsupportedModelError) as e:
        lmgen.load(path)
    assert str(e.value) == f"{path}: GGUF version {version} is not supported (2 and 3 are)"
    assert e.value.path == path


def test_a_big_endian_gguf_is_called_one(tmp_path):
    path = tiny_gguf(tmp_path / "be.gguf", 3 << 24)  # version 3, written big-endian
    with pytest.raises(UnsupportedModelError, match=r"be\.gguf: GGUF version 50331648 \(a big-endian file\?\)"):
        lmgen.load(path)


# --- pytorch_model.bin: the legacy (pre-1.6, non-zip) format loads; pickled code never runs ------------------------


def legacy_bin_copy(src: Path, dest: Path) -> Path:
    """The model folder with its weights re-saved as a legacy pytorch_model.bin from the model's state_dict."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(model.state_dict(), dest / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(dest / "pytorch_model.bin")
    return dest


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_legacy_pytorch_bin_generates_like_safetensors(request, tmp_path, model):
    src = request.getfixturevalue(model)
    folder = legacy_bin_copy(src, tmp_path / "m")
    expected = lmgen.load(src).generate(SEED_IDS, max_new_tokens=10)[0].token_ids
    assert lmgen.load(folder).generate(SEED_IDS, max_new_tokens=10)[0].token_ids == expected


class Payload:
    """Unpickling this makes a directory: the stand-in for code a malicious checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_a_pickle_with_code_is_refused_unrun(tmp_path, tiny_gpt2_dir, zip_format):
    folder, marker = tmp_path / "m", tmp_path / "pwned"
    shutil.copytree(tiny_gpt2_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = folder / "pytorch_model.bin"
    torch.save({"transformer.wte.weight": Payload(marker)}, weights, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(weights) == zip_format
    with pytest.raises(CorruptFileError) as e:
        lmgen.load(folder)
    assert e.value.path == weights and str(weights) in str(e.value)
    assert "Python objects other than tensors" in str(e.value) and "weights_only" not in str(e.value)
    assert not marker.exists()
    torch.load(weights, weights_only=False)  # the payload is live: a plain unpickle runs it
    assert marker.is_dir()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_a_qwen_sliding_window_is_refused_naming_the_file(arch, tmp_path):
    import lmgen
    from lmgen.errors import UnsupportedModelError

    from . import conftest

    folder = getattr(conftest, f"make_tiny_{arch}")(tmp_path / arch)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, use_sliding_window=True, sliding_window=32)))
    with pytest.raises(UnsupportedModelError, match=r"config\.json: use_sliding_window is not supported"):
        lmgen.load(folder)


@pytest.mark.parametrize("window", ["6", 0])
def test_a_bad_mistral_sliding_window_is_named(window, tmp_path):
    import lmgen
    from lmgen.errors import ConfigError

    from .conftest import make_tiny_mistral

    folder = make_tiny_mistral(tmp_path / "mistral")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, sliding_window=window)))
    with pytest.raises(ConfigError, match=r"config\.json: key 'sliding_window' must be"):
        lmgen.load(folder)


def test_a_qwen3_config_without_head_dim_takes_transformers_default():
    transformers = pytest.importorskip("transformers")
    from lmgen.models import qwen3

    config = transformers.Qwen3Config(hidden_size=64, num_attention_heads=4).to_dict()
    del config["head_dim"]  # Qwen3Config's own default then: 128, not hidden / heads
    assert qwen3.Config.from_hf(config).head_dim == transformers.Qwen3Config(**config).head_dim == 128
