import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (run with -m slow, or SPM_SLOW=1 in CI)")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread (and do not thrash when other jobs share the cores).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer():
    from spm.tokenizer import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="session")
def text_encoder():
    """A small random CLIP text encoder over the real vocabulary (width 32)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407)
    return CLIPTextModel(cfg).eval()


@pytest.fixture(scope="session")
def encode(tokenizer, text_encoder):
    """``encode(texts) -> (hidden [n, 77, 32], token ids)`` as a host would provide."""

    def _encode(texts):
        ids = tokenizer(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = text_encoder(ids).last_hidden_state
        return hidden, [tokenizer(t).input_ids for t in texts]

    return _encode
