"""Our GGUF parser reads exactly what gguf-py's GGUFReader reads, and names truncation."""

from __future__ import annotations

import numpy as np
import pytest

from lmgen.weights.gguf_format import GGUFParseError, read_gguf

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def both(embedded_path):
    reader = gguf.GGUFReader(embedded_path)
    return read_gguf(embedded_path), reader


def test_metadata_equals_gguf_py(both):
    (metadata, _), reader = both
    # GGUFReader also lists the header as pseudo-keys (GGUF.version, ...), which are not metadata.
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert metadata.keys() == expected.keys()
    for key, value in expected.items():
        assert metadata[key] == value, key
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152 and metadata["general.architecture"] == "llama"


def test_tensors_equal_gguf_py(both):
    (_, tensors), reader = both
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for ours, ref in zip(tensors, reader.tensors):
        assert ours.tensor_type == int(ref.tensor_type)
        assert ours.shape == tuple(int(n) for n in reversed(ref.shape))
        assert np.array_equal(ours.data, np.asarray(ref.data).view(np.uint8).reshape(-1))


def test_truncated_file_is_named_as_truncated(tmp_path, embedded_path):
    cut = tmp_path / "cut.gguf"
    data = embedded_path.read_bytes()
    for size, message in [(60_000_000, "truncated"), (200_000, "past the end"), (10, "error")]:
        cut.write_bytes(data[:size])
        with pytest.raises(GGUFParseError, match=message):
            read_gguf(cut)
