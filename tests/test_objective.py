"""The weighted objective: SKU and baseline settings, per-token normalisers, and the three
loss backends against an fp64 per-sample reference computed row by row without padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model_dir

from sku_fast.unlearn.batches import BatchStream
from sku_fast.unlearn.config import UnlearnConfig
from sku_fast.unlearn.data import demo_data_path, load_qa_pairs
from sku_fast.unlearn.network import compute_terms, prepare_model
from sku_fast.unlearn.objective import TERM_IDS, Objective, combine, objective_for, row_weights
from sku_fast.unlearn.tokens import IGNORE_INDEX


def test_sku_and_baseline_are_settings_of_one_objective():
    sku = objective_for(UnlearnConfig(method="sku", k=3).resolve())  # the default: keep
    assert sku == Objective(gd=1.0, rd=1.0, pd=3.0, k=3, random_source="harmful")
    paper = objective_for(UnlearnConfig(preservation="diverge").resolve())
    assert paper == Objective(gd=2.5, rd=2.5, pd=-1.0, k=1, random_source="harmful")
    ga = objective_for(UnlearnConfig(method="ga").resolve())
    assert ga == Objective(gd=-0.5, rd=1.0, pd=1.0, k=1, random_source="normal")
    ablated = objective_for(
        UnlearnConfig(
            epsilon=[1, 2, 3], random_disassociation=False, preservation_divergence=False
        ).resolve()
    )
    assert (ablated.gd, ablated.rd, ablated.pd) == (1.0, 0.0, 0.0)
    assert not ablated.active("rd") and ablated.active("gd")


def test_row_weights_average_samples_then_tokens():
    i = IGNORE_INDEX
    labels = torch.tensor(
        [[i, 1, 2, i], [i, i, 3, i], [i, 4, 5, 6], [i, 7, i, i], [8, 9, i, i]]
    )  # rows: gd (2 tokens), gd (1), rd (3), pd (1), pd (2)
    terms = torch.tensor([TERM_IDS[t] for t in ("gd", "gd", "rd", "pd", "pd")])
    w = row_weights(labels, terms)
    expected = torch.tensor(
        [
            [0, 1 / 4, 1 / 4, 0],
            [0, 0, 1 / 2, 0],
            [0, 1 / 3, 1 / 3, 1 / 3],
            [0, 1 / 3, 0, 0],
            [1 / 3, 1 / 3, 0, 0],
        ]
    )
    torch.testing.assert_close(w, expected)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A tiny LoRA model whose adapter is non-zero (policy ≠ reference) and one micro-batch
    with every term (K = 2)."""
    from sku_fast.unlearn.models import load_model, load_tokenizer

    path = tiny_model_dir(tmp_path_factory.mktemp("obj") / "m", tied=False)
    config = UnlearnConfig(model=str(path), lora_r=4, lora_alpha=8, k=2, max_length=160).resolve()
    model = prepare_model(load_model(path), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.trainable:
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    objective = objective_for(config)
    stream = BatchStream(
        load_tokenizer(path),
        load_qa_pairs(demo_data_path("harmful")),
        load_qa_pairs(demo_data_path("normal")),
        objective,
        batch_size=3,
        max_length=160,
        seed=0,
    )
    return model, objective, stream.micro_batch(5)


def _reference(model, batch) -> dict[str, float]:
    """fp64, one unpadded row at a time: gd/rd mean over rows of the mean token CE, pd the
    mean over all pd answer tokens of KL(reference ‖ policy)."""
    network = model.network
    network.double()
    try:
        per_term = {"gd": [], "rd": [], "pd": []}
        for row in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row : row + 1, :length]
            labels = batch["labels"][row, 1:length]
            counted = labels != IGNORE_INDEX
            with torch.no_grad():
                logits = network(input_ids=ids).logits[0, :-1][counted]
                term = {v: k for k, v in TERM_IDS.items()}[int(batch["term"][row])]
                if term == "pd":
                    with network.disable_adapter():
                        ref = network(input_ids=ids).logits[0, :-1][counted]
                    kl = F.kl_div(
                        logits.log_softmax(-1),
                        ref.log_softmax(-1),
                        log_target=True,
                        reduction="none",
                    ).sum(-1)
                    per_term["pd"] += kl.tolist()
                else:
                    per_term[term].append(F.cross_entropy(logits, labels[counted]).item())
        return {k: sum(v) / len(v) for k, v in per_term.items()}
    finally:
        network.float()


@pytest.mark.parametrize("backend", ["fused-linear", "fused", "torch"])
def test_backends_match_the_fp64_reference(setting, backend):
    model, objective, batch = setting
    assert batch["term"].tolist() == [0] * 3 + [1] * 6 + [2] * 3
    assert (batch["attention_mask"] == 0).any()  # padding present
    expected = _reference(model, batch)
    values = compute_terms(model, batch, objective, backend)
    assert set(values) == {"gd", "rd", "pd"}
    for name, value in values.items():
        assert value.item() == pytest.approx(expected[name], rel=2e-5, abs=1e-7), name
    assert expected["pd"] > 1e-4  # the KL is really exercised


def test_backends_give_the_same_gradients(setting):
    model, objective, batch = setting
    grads = {}
    for backend in ("fused-linear", "fused", "torch"):
        for _, parameter in model.trainable:
            parameter.grad = None
        combine(compute_terms(model, batch, objective, backend), objective).backward()
        grads[backend] = [p.grad.clone() for _, p in model.trainable]
    for backend in ("fused", "torch"):
        for got, want in zip(grads[backend], grads["fused-linear"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert any(bool(g.abs().sum() > 0) for g in grads["torch"])


def test_switched_off_terms_are_not_computed(setting):
    model, _, batch = setting
    only_gd = Objective(gd=1.0, rd=0.0, pd=0.0)
    values = compute_terms(model, batch, only_gd, "fused-linear")
    assert set(values) == {"gd"}
    assert combine(values, only_gd).item() == pytest.approx(values["gd"].item())


@pytest.mark.parametrize("backend", ["fused-linear", "fused", "torch"])
def test_the_kl_cap_stops_the_gradient_of_tokens_beyond_it(setting, backend):
    """A diverging pd term with cap κ is Σ w·min(KL, κ): tokens whose KL exceeds κ give no
    gradient. With κ below every token's KL the term is constant (no gradient at all); with κ
    above all of them it equals the uncapped term."""
    model, _, batch = setting
    uncapped = Objective(gd=0.0, rd=1.0, pd=-1.0)
    reference = compute_terms(model, batch, uncapped, backend)["pd"].item()
    high = Objective(gd=0.0, rd=1.0, pd=-1.0, kl_cap=1e3)
    assert compute_terms(model, batch, high, backend)["pd"].item() == pytest.approx(reference)

    low = Objective(gd=0.0, rd=1.0, pd=-1.0, kl_cap=1e-12)
    for _, parameter in model.trainable:
        parameter.grad = None
    values = compute_terms(model, batch, low, backend)
    assert values["pd"].item() == pytest.approx(1e-12, rel=1e-3)  # weights sum to one
    values["pd"].backward()
    assert all(p.grad is None or not p.grad.any() for _, p in model.trainable)


def test_the_cap_applies_to_a_diverging_term_only():
    assert Objective(gd=1, rd=1, pd=-1, kl_cap=0.1).cap("pd") == 0.1
    assert Objective(gd=1, rd=1, pd=1, kl_cap=0.1).cap("pd") is None  # a kept KL is bounded
    assert Objective(gd=1, rd=1, pd=-1, sp=1, kl_cap=0.1).cap("sp") is None


def test_safe_answer_rows_follow_the_harmful_samples(tmp_path_factory):
    """ "sp" rows pair each harmful prompt of the micro-batch with its own safe answer, where
    it has one; the term is a mean KL over their answer tokens."""
    from sku_fast.unlearn.data import QAPair
    from sku_fast.unlearn.models import load_tokenizer

    path = tiny_model_dir(tmp_path_factory.mktemp("sp") / "m")
    harmful = [QAPair(f"bad question {i}?", f"bad answer {i}.") for i in range(6)]
    safe = [f"I will not help with {i}." if i % 2 else None for i in range(6)]
    objective = Objective(gd=1.0, rd=0.0, pd=0.0, sp=1.0)
    stream = BatchStream(load_tokenizer(path), harmful, harmful, objective, batch_size=4,
                         max_length=64, seed=0, safe=safe)  # fmt: skip
    batch = stream.micro_batch(0)
    chosen = stream.harmful_order.take(0, 4)
    with_safe = [i for i in chosen if safe[i] is not None]
    assert batch["term"].tolist() == [TERM_IDS["gd"]] * 4 + [TERM_IDS["sp"]] * len(with_safe)
    tokenizer = load_tokenizer(path)
    for row, i in zip(range(4, 4 + len(with_safe)), with_safe, strict=True):
        text = tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row] == 1])
        assert harmful[i].prompt in text and safe[i] in text
    with pytest.raises(ValueError, match="one safe answer"):
        BatchStream(tokenizer, harmful, harmful, objective, batch_size=2, max_length=64, seed=0)


def test_anchors_join_the_guided_distortion_rows_but_never_the_random_answers(tmp_path_factory):
    """Each micro-batch of B harmful samples adds anchor_rows(B) anchor pairs as "gd" rows,
    taken in a seeded order; the random answers of "rd" rows stay harmful answers."""
    from sku_fast.unlearn.batches import anchor_rows
    from sku_fast.unlearn.data import QAPair
    from sku_fast.unlearn.models import load_tokenizer

    path = tiny_model_dir(tmp_path_factory.mktemp("anchor") / "m")
    tokenizer = load_tokenizer(path)
    harmful = [QAPair(f"bad question {i}?", f"bad answer {i}.") for i in range(6)]
    anchors = [QAPair(f"harmless question {i}?", f"I will not say {i}.") for i in range(5)]
    objective = Objective(gd=1.0, rd=1.0, pd=0.0, k=2)
    stream = BatchStream(tokenizer, harmful, harmful, objective, batch_size=4, max_length=64,
                         seed=0, anchors=anchors)  # fmt: skip
    assert anchor_rows(4) == 2 and anchor_rows(1) == 1
    seen = []
    for index in range(5):  # past one pass over the anchors
        batch = stream.micro_batch(index)
        assert batch["term"].tolist() == [TERM_IDS["gd"]] * 6 + [TERM_IDS["rd"]] * 8
        texts = [tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row] == 1])
                 for row in range(len(batch["term"]))]  # fmt: skip
        chosen = stream.anchor_order.take(index * 2, 2)
        for text, i in zip(texts[4:6], chosen, strict=True):
            assert anchors[i].prompt in text and anchors[i].answer in text
        assert not any("harmless" in text or "will not say" in text for text in texts[6:])
        seen += chosen
    assert sorted(seen[:5]) == list(range(5))  # a permutation per pass
