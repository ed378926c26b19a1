"""fastText binary models (.bin): detection, word vectors as fastText's get_word_vector computes them (checked
against gensim and fastText's own .vec output on gensim's real models, and by hand on tiny generated files),
and clear errors for truncated, quantised and supervised models."""
import struct

import numpy as np
import pytest

from lowcost.warmstart.vectors import (VectorFormatError, _fasttext_hash, _fasttext_ngrams, detect_format,
                                       iter_vectors, read_vectors)

MAGIC = 793712314


def _ft_bin(path, words, matrix, *, minn=3, maxn=4, bucket=1, model=2, version=12, quant=False, labels=(),
            prune=-1, output=True):
    """Writes a complete fastText .bin (words first, then labels; input matrix ``matrix``; zero output)."""
    dim = matrix.shape[1]
    data = struct.pack("<2i", MAGIC, version)
    data += struct.pack("<12id", dim, 5, 5, 1, 5, 1, 2, model, bucket, minn, maxn, 100, 1e-4)
    entries = [(w, 0) for w in words] + [(label, 1) for label in labels]
    data += struct.pack("<3i2q", len(entries), len(words), len(labels), 1000, prune)
    for word, kind in entries:
        raw = word if isinstance(word, bytes) else word.encode("utf-8")
        data += raw + b"\0" + struct.pack("<qb", 7, kind)
    data += struct.pack("<ii", 0, 0) * max(prune, 0)
    data += struct.pack("<?", quant)
    data += struct.pack("<2q", *matrix.shape) + matrix.astype("<f4").tobytes()
    if output:
        data += struct.pack("<?", False) + struct.pack("<2q", len(words), dim)
        data += np.zeros((len(words), dim), "<f4").tobytes()
    path.write_bytes(data)
    return path


def test_toy_model_ngram_means_by_hand(tmp_path):
    # bucket 1: every n-gram lands on the one bucket row, so a word's vector is (own + k·bucket) / (1 + k)
    # with k its number of 3- and 4-grams of "<word>": "<ab>" → <ab ab> <ab> (3); "<xyz>" → <xy xyz yz>
    # <xyz xyz> (5); "q" → "<q>" only (1: the 1-grams "<" ">" never count, "q" is shorter than minn).
    words = ["ab", "xyz", "q"]
    matrix = np.array([[1, 0], [0, 1], [2, 2], [3, -3]], np.float32)     # 3 word rows + 1 bucket row
    path = _ft_bin(tmp_path / "toy.bin", words, matrix)
    assert detect_format(path) == "fasttext-binary"
    got = read_vectors(path)
    assert got.words == words and got.format == "fasttext-binary" and got.dim == 2
    bucket = np.array([3, -3], np.float32)
    want = np.stack([(matrix[0] + 3 * bucket) / 4, (matrix[1] + 5 * bucket) / 6, (matrix[2] + 1 * bucket) / 2])
    np.testing.assert_allclose(got.vectors, want, rtol=0, atol=1e-6)


def test_toy_model_unigrams_skip_the_boundary_marks(tmp_path):
    # minn 1, maxn 2, bucket 1: "<ab>" → a b (not < or >) and <a ab b> → 5 n-grams; "<é>" → é <é é> → 3
    matrix = np.array([[6, 0], [0, 6], [0, 0]], np.float32)
    got = read_vectors(_ft_bin(tmp_path / "uni.bin", ["ab", "é"], matrix, minn=1, maxn=2))
    np.testing.assert_allclose(got.vectors, [[1, 0], [0, 1.5]], rtol=0, atol=1e-6)


def test_toy_model_hashes_non_ascii_ngrams(tmp_path, gensim_data):
    from gensim.models.fasttext import load_facebook_vectors
    from gensim.models.fasttext_inner import ft_hash_bytes
    # "né": characters < n é > (é is 2 bytes); 2- and 3-grams: <n, né, é>, <né, né>
    words, bucket = ["né", "to"], 7
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(len(words) + bucket, 3)).astype(np.float32)
    path = _ft_bin(tmp_path / "toy.bin", words, matrix, minn=2, maxn=3, bucket=bucket)
    grams = ["<n", "né", "é>", "<né", "né>"]
    rows = [0] + [len(words) + ft_hash_bytes(g.encode("utf-8")) % bucket for g in grams]
    got = read_vectors(path)
    np.testing.assert_allclose(got.vectors[0], matrix[rows].mean(0), rtol=0, atol=1e-6)
    gensim = load_facebook_vectors(str(path))
    np.testing.assert_allclose(got.vectors, np.stack([gensim[w] for w in words]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("text", ["привет", "naïve", "日本語", "abc", "\u00ff\u0100"])
def test_hash_sign_extends_bytes_like_fasttext(text):
    from gensim.models.fasttext_inner import ft_hash_bytes
    data = text.encode("utf-8")
    assert _fasttext_hash(data) == ft_hash_bytes(data)
    if not text.isascii():      # a plain unsigned FNV-1a differs exactly when a byte ≥ 0x80 is hashed
        h = 2166136261
        for byte in data:
            h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
        assert h != _fasttext_hash(data)


def test_ngrams_match_gensim():
    from gensim.models.fasttext_inner import ft_hash_bytes
    from gensim.models.fasttext_inner import compute_ngrams_bytes
    for word in ["привет", "cat", "a", "naïve"]:
        want = sorted(ft_hash_bytes(g) % 1000 for g in compute_ngrams_bytes(word, 3, 6))
        assert sorted(_fasttext_ngrams(word.encode("utf-8"), 3, 6, 1000)) == want


def test_real_model_matches_gensim(gensim_data):
    """crime-and-punishment.bin (skipgram, dim 5, 291 words, about 200 of them Cyrillic)."""
    from gensim.models.fasttext import load_facebook_vectors
    path = gensim_data("crime-and-punishment.bin")
    assert detect_format(path) == "fasttext-binary"
    got = read_vectors(path)
    kv = load_facebook_vectors(path)
    assert got.words == list(kv.index_to_key) and got.vectors.shape == (291, 5) and got.bad_utf8 == 0
    checked = [w for w in got.words if w != "</s>"]
    assert sum(not w.isascii() for w in checked) > 100
    diff = max(float(np.abs(got.vectors[got.words.index(w)] - kv[w]).max()) for w in checked)
    assert diff < 1e-5
    # "</s>": fastText gives the end-of-sentence token no n-grams (its vector is its own row); gensim averages
    # n-grams for it too. fastText's own .vec output for this model settles it.
    eos = got.vectors[got.words.index("</s>")]
    np.testing.assert_array_equal(eos, kv.vectors_vocab[kv.key_to_index["</s>"]])
    written = read_vectors(gensim_data("crime-and-punishment.vec"))      # printed with 5 significant digits
    theirs = dict(zip(written.words, written.vectors))
    assert max(float(np.abs(v - theirs[w]).max()) for w, v in zip(got.words, got.vectors)) < 2e-5


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_small_read_chunks_parse_the_same(gensim_data, monkeypatch, chunk):
    """Words and records cut across buffer refills (the default buffer holds these files whole)."""
    from lowcost.warmstart import vectors
    path = gensim_data("crime-and-punishment.bin")
    whole = read_vectors(path)
    monkeypatch.setattr(vectors, "_CHUNK", chunk)
    got = read_vectors(path)
    assert got.words == whole.words
    np.testing.assert_array_equal(got.vectors, whole.vectors)


def test_real_version_11_model_matches_gensim(gensim_data):
    from gensim.models.fasttext import load_facebook_vectors
    path = gensim_data("lee_fasttext_new.bin")
    got = read_vectors(path)
    kv = load_facebook_vectors(path)
    rows = [i for i, w in enumerate(got.words) if w != "</s>"]
    assert len(rows) == 1762
    want = np.stack([kv[got.words[i]] for i in rows])
    assert float(np.abs(got.vectors[rows] - want).max()) < 1e-5


def test_streams_and_keep_filter(tmp_path):
    matrix = np.arange(8, dtype=np.float32).reshape(4, 2)
    path = _ft_bin(tmp_path / "toy.bin", ["ab", "xyz", "q"], matrix)
    word, vector, bad = next(iter_vectors(path))
    assert word == "ab" and vector.shape == (2,) and bad is False
    got = read_vectors(path, keep=lambda w: w != "xyz")
    assert got.words == ["ab", "q"] and got.skipped == 1


def test_bad_utf8_word_tolerated(tmp_path):
    matrix = np.ones((3, 2), np.float32)
    got = read_vectors(_ft_bin(tmp_path / "bad.bin", [b"c\xffat", "dog"], matrix))
    assert got.bad_utf8 == 1 and got.words == ["c\ufffdat", "dog"]
    np.testing.assert_allclose(got.vectors, 1.0)


# layout of this file: header 0–8, arguments –64, dictionary header –92, entries "ab" –104, "xyz" –117,
# "q" –128, quantisation flag –129, matrix header –145, matrix data –177 (no output matrix)
@pytest.mark.parametrize("cut,where", [(6, "the header"), (40, "the model arguments"),
                                       (80, "the dictionary header"), (95, "dictionary entry 1 of 3"),
                                       (110, "dictionary entry 2 of 3"), (128, "the quantisation flag"),
                                       (140, "the input matrix header"), (157, "the input matrix")])
def test_truncated_file(tmp_path, cut, where):
    path = _ft_bin(tmp_path / "toy.bin", ["ab", "xyz", "q"], np.ones((4, 2), np.float32), output=False)
    data = path.read_bytes()
    assert len(data) == 177
    read_vectors(path)                                       # whole, it reads
    data = data[:cut]
    path.write_bytes(data)
    with pytest.raises(VectorFormatError, match=rf"toy\.bin: truncated fastText model: the file ends at byte "
                                                rf"{len(data)} inside .*{where}"):
        read_vectors(path)


def test_quantised_model_refused(tmp_path):
    path = _ft_bin(tmp_path / "model.ftz", ["ab"], np.ones((2, 2), np.float32), quant=True)
    with pytest.raises(VectorFormatError, match=r"model\.ftz: a quantised fastText model \(\.ftz\)"):
        read_vectors(path)


def test_pruned_model_refused(tmp_path):
    path = _ft_bin(tmp_path / "p.bin", ["ab"], np.ones((2, 2), np.float32), prune=2)
    with pytest.raises(VectorFormatError, match="pruned"):
        read_vectors(path)


def test_supervised_models_refused(tmp_path, gensim_data):
    path = _ft_bin(tmp_path / "sup.bin", ["ab"], np.ones((1, 2), np.float32), model=3, labels=["__label__x"],
                   minn=0, maxn=0, bucket=0)
    with pytest.raises(VectorFormatError, match=r"sup\.bin: a supervised fastText model"):
        read_vectors(path)
    real = gensim_data("pang_lee_polarity_fasttext.bin")     # a real classifier: 2 labels, maxn 0
    with pytest.raises(VectorFormatError, match="supervised"):
        read_vectors(real)


def test_unsupported_version_and_bad_matrix(tmp_path):
    path = _ft_bin(tmp_path / "v.bin", ["ab"], np.ones((2, 2), np.float32), version=13)
    with pytest.raises(VectorFormatError, match="version 13"):
        detect_format(path)
    path = _ft_bin(tmp_path / "m.bin", ["ab"], np.ones((3, 2), np.float32))      # 1 word + 1 bucket ≠ 3 rows
    with pytest.raises(VectorFormatError, match="input matrix is 3×2, expected 2×2"):
        read_vectors(path)
