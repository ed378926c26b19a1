"""Vector-file readers: every format on tiny generated files and on gensim's real files; bad input."""
import struct

import numpy as np
import pytest

from lowcost.warmstart.vectors import VectorFormatError, detect_format, iter_vectors, read_vectors

ROWS = {"the": [0.5, -1.0, 2.0], "cat": [1.0, 0.0, -0.25], "Sat": [3.0, 1.5, 0.0]}


def _text(path, header=True, rows=ROWS, extra=b""):
    lines = [f"{len(rows)} 3"] if header else []
    lines += [w + " " + " ".join(str(v) for v in vec) for w, vec in rows.items()]
    path.write_bytes(("\n".join(lines) + "\n").encode() + extra)
    return path


def _binary(path, rows=ROWS, truncate=0):
    data = f"{len(rows)} 3\n".encode()
    for word, vec in rows.items():
        data += word.encode() + b" " + struct.pack("<3f", *vec) + b"\n"
    path.write_bytes(data[: len(data) - truncate])
    return path


@pytest.mark.parametrize("kind,fmt", [("w2v", "word2vec-text"), ("glove", "glove"), ("bin", "word2vec-binary")])
def test_formats_round_trip(tmp_path, kind, fmt):
    path = {"w2v": lambda: _text(tmp_path / "a.vec"), "glove": lambda: _text(tmp_path / "a.txt", header=False),
            "bin": lambda: _binary(tmp_path / "a.bin")}[kind]()
    assert detect_format(path) == fmt
    got = read_vectors(path)
    assert got.words == list(ROWS) and got.format == fmt
    np.testing.assert_allclose(got.vectors, np.array(list(ROWS.values()), np.float32))


def test_bad_utf8_tolerated_and_counted(tmp_path):
    path = _text(tmp_path / "bad.vec", rows={**ROWS})
    data = path.read_bytes().replace(b"cat", b"c\xffat")
    path.write_bytes(data)
    got = read_vectors(path)
    assert got.bad_utf8 == 1 and "c\ufffdat" in got.words


def test_streams_without_reading_everything(tmp_path):
    path = _text(tmp_path / "a.vec")
    first = next(iter_vectors(path))
    assert first[0] == "the" and first[1].shape == (3,)


@pytest.mark.parametrize("content,match", [
    (b"", "empty"), (b"   \n\n", "empty"), (b"hello world\nfoo bar\n", "unknown vector format"),
    (b"2 3\nthe 1 2 3\ncat 1 2\n", "2 values, expected 3"), (b"the 1 2 3\ncat 1 2\n", "expected 3"),
    (b"2 3\nthe 1 2 x\ncat 1 2 3\n", "non-numeric|unknown|3 values"),
])
def test_bad_input_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(VectorFormatError, match=match):
        read_vectors(path)


def test_wrong_dimension(tmp_path):
    with pytest.raises(VectorFormatError, match="dimension 3, expected 5"):
        read_vectors(_text(tmp_path / "a.vec"), expected_dim=5)


def test_truncated_binary(tmp_path):
    with pytest.raises(VectorFormatError, match="truncated"):
        read_vectors(_binary(tmp_path / "a.bin", truncate=6))


def test_fasttext_model_binary_detected(gensim_data):
    # fastText .bin models are read (tests/warmstart/test_fasttext_bin.py); word2vec binary stays word2vec
    assert detect_format(gensim_data("crime-and-punishment.bin")) == "fasttext-binary"
    assert detect_format(gensim_data("euclidean_vectors.bin")) == "word2vec-binary"


@pytest.mark.parametrize("name,fmt,n,dim", [
    ("test_glove.txt", "glove", 76, 50),
    ("lee_fasttext.vec", "word2vec-text", 1762, 10),
    ("pang_lee_polarity_fasttext.vec", "word2vec-text", None, 100),
    ("EN.1-10.cbow1_wind5_hs0_neg10_size300_smpl1e-05.txt", "word2vec-text", 20, 300),
    ("euclidean_vectors.bin", "word2vec-binary", None, 10),
])
def test_real_gensim_files(gensim_data, name, fmt, n, dim):
    got = read_vectors(gensim_data(name))
    assert got.format == fmt and got.dim == dim
    if n is not None:
        assert len(got.words) == n
    assert np.isfinite(got.vectors).all()


def test_real_file_with_bad_utf8(gensim_data):
    got = read_vectors(gensim_data("pang_lee_polarity_fasttext.vec"))
    assert got.bad_utf8 > 0 and len(got.words) + got.duplicates == 1694
