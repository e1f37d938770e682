"""The real Gemma 3 270M: our loader and decoder vs transformers reading the same GGUF."""

import numpy as np
import pytest
import torch

from edge.generation import encode_prompt, generate
from edge.models.loading import embedded_gguf, load_weights
from edge.models.variants import get_variant
from edge.models.weights.hf import to_hf_state_dict
from edge.runtime.eager import EagerRunner

pytestmark = pytest.mark.slow

PROMPTS = {
    "prose": ("The history of the printing press begins", False),
    "code": ('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n', False),
    "chat": ("What is the capital of France? Answer in one sentence.", True),
}
NEW_TOKENS = 24


@pytest.fixture(scope="session")
def loaded():
    return load_weights(get_variant("270m"))


@pytest.fixture(scope="session")
def ours(loaded):
    return loaded.build(max_seq_len=256)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def test_weights_equal_transformers_gguf_loader(loaded, hf_model):
    """Our GGUF dequantization + name map + norm offset give transformers' tensors exactly."""
    theirs = hf_model.state_dict()
    mine = to_hf_state_dict(loaded.config, loaded.tensors)
    assert len(mine) == 236  # every tensor of the file, the tied head not duplicated
    worst = max((mine[k] - theirs[k]).abs().max().item() for k in mine)
    assert worst == 0.0


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_continuation_and_logits_match_transformers(name, loaded, ours, hf_model):
    text, chat = PROMPTS[name]
    ids = encode_prompt(loaded.tokenizer, text, chat)
    result = generate(EagerRunner(ours), loaded.tokenizer, ids, NEW_TOKENS)
    hf_out = hf_model.generate(
        torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=loaded.tokenizer.stop_ids
    )[0, len(ids) :].tolist()
    hf_out = [t for t in hf_out if t not in loaded.tokenizer.stop_ids]
    assert result.output_ids == hf_out[: len(result.output_ids)]
    assert len(result.output_ids) >= 8, "a continuation this short tests little"

    seq = ids + result.output_ids
    mine = EagerRunner(ours).all_logits(seq)
    theirs = hf_model(torch.tensor([seq])).logits[0].numpy()
    delta = float(np.abs(mine - theirs).max())
    print(
        f"{name}: {len(seq)} positions, max |dlogit| {delta:.2e}, output {loaded.tokenizer.decode(result.output_ids)!r}"
    )
    assert delta < 1e-3
