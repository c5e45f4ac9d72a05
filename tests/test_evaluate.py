import json
import math

import pytest
import torch
from click.testing import CliRunner
from tiny_models import smol_llama_dir

from sku_fast.cli import main
from sku_fast.errors import ConfigError
from sku_fast.eval.evaluate import EvalConfig, Reference, evaluate_model, load_set
from sku_fast.eval.generation import GenerationConfig, format_prompt, generate
from sku_fast.eval.metrics import answer_nll
from sku_fast.unlearn.data import demo_data_path, load_qa_pairs


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 2-layer Llama with the embedded SmolLM2 tokenizer (and so its
    chat template), saved like any Hugging Face model directory."""
    return smol_llama_dir(tmp_path_factory.mktemp("tiny-llama"), max_position_embeddings=512)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    return Reference.load(tiny_model_dir)


PROMPTS = ["Hi", "What is the capital of France?", "Tell me a long story about a dragon."]


def test_left_padded_batches_match_one_by_one(tiny):
    config = GenerationConfig(max_new_tokens=6, batch_size=3)
    batched = generate(tiny.model, tiny.tokenizer, PROMPTS, config)
    alone = generate(tiny.model, tiny.tokenizer, PROMPTS, GenerationConfig(6, batch_size=1))
    assert batched == alone
    assert all(isinstance(text, str) for text in batched)
    # the chat template is what the model continues
    assert format_prompt(tiny.tokenizer, "Hi").endswith("<|im_start|>assistant\n")


def test_seeded_sampling_repeats_and_seed_matters(tiny):
    def run(seed):
        config = GenerationConfig(max_new_tokens=8, sample=True, temperature=1.0, seed=seed)
        return generate(tiny.model, tiny.tokenizer, PROMPTS, config)

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_generation_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1, got 0"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match=r"temperature in \(0, 100\], got 0"):
        GenerationConfig(sample=True, temperature=0)
    with pytest.raises(ConfigError, match=r"top_p in \(0, 1\], got 0"):
        GenerationConfig(sample=True, top_p=0)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--sample", "--temperature", "0"], "sampling needs a temperature in (0, 100], got 0.0"),
        (["--sample", "--top-p", "0"], "sampling needs top_p in (0, 1], got 0.0"),
        (["--device", "cuda"], "--device cuda: this torch is a CPU-only build; use --device cpu"),
        (["--device", "gpu0"], "--device 'gpu0' is not a device"),
        (["--judge", "no/such/judge"], "--judge 'no/such/judge' is neither 'rules', 'keyword'"),
    ],
    ids=["temperature-0", "top-p-0", "cuda-on-cpu", "no-device", "bad-judge"],
)
def test_bad_eval_options_are_one_line_before_anything_runs(tmp_path, options, message):
    if "cuda" in options and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(main, ["eval", "--out", str(tmp_path / "e"), *options])
    assert result.exit_code == 1
    assert result.output == f"Error: {message}" + result.output.split(message, 1)[1]
    assert result.output.count("\n") == 1
    assert not (tmp_path / "e").exists()


def test_evaluate_model_writes_consistent_outputs(tiny_model_dir, tiny, tmp_path):
    config = EvalConfig(n=4, generation=GenerationConfig(max_new_tokens=8, batch_size=3))
    messages = []
    results = evaluate_model(
        tiny_model_dir, config, out=tmp_path, reference=tiny, log=messages.append
    )
    assert any("generating 4 harmful responses" in m for m in messages)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    harmful, normal, harmless = results["harmful"], results["normal"], results["harmless"]
    assert harmful["n"] == normal["n"] == harmless["n"] == 4
    # the four response categories partition the harmful set
    parts = ("harmful_rate", "refusal_rate", "degenerate_rate", "off_topic_rate")
    assert sum(harmful[k] for k in parts) == pytest.approx(1.0)
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").open()]
    assert [r["set"] for r in records] == ["harmful"] * 4 + ["normal"] * 4 + ["harmless"] * 4
    judged = [r for r in records if r["set"] == "harmful"]
    assert harmful["harmful_rate"] == sum(r["harmful"] for r in judged) / 4
    # the model is its own reference here: same greedy text, similarity 1
    normal_records = [r for r in records if r["set"] == "normal"]
    assert all(r["response"] == r["reference_response"] for r in normal_records)
    assert normal["similarity"] == pytest.approx(1.0, abs=1e-4)
    # NLL and fluency agree with the metric computed directly
    pairs = load_qa_pairs(demo_data_path("normal"))[:4]
    direct = answer_nll(tiny.model, tiny.tokenizer, [p.prompt for p in pairs],
                        [p.answer for p in pairs])  # fmt: skip
    assert normal["nll"] == pytest.approx(direct.mean_nll, rel=1e-5)
    fluency = answer_nll(tiny.model, tiny.tokenizer, [p.prompt for p in pairs],
                         [r["response"] for r in normal_records])  # fmt: skip
    assert normal["fluency_ppl"] == pytest.approx(math.exp(fluency.mean_nll), rel=1e-5)
    # a random model has not learned to answer: its NLL is near log(vocab)
    assert normal["nll"] > 0.5 * math.log(len(tiny.tokenizer))
    summary = (tmp_path / "summary.md").read_text()
    assert "## Harmful prompts (n = 4)" in summary
    assert f"Judge: `{results['judge']}`" in summary


def test_harmless_set_may_be_prompts_only(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"instruction": "Name a fruit."}\n{"instruction": "Count to three."}\n')
    pairs = load_set("harmless", path, None)
    assert [p.prompt for p in pairs] == ["Name a fruit.", "Count to three."]
    with pytest.raises(Exception, match="cannot tell the prompt and answer"):
        load_set("harmful", path, None)  # harmful and normal sets need answers


def test_eval_command_runs_offline(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        main,
        [
            "eval", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--n", "2",
            "--max-new-tokens", "4", "--similarity", "lexical", "--judge", "keyword",
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["judge"] == "keyword"
    assert results["normal"]["similarity_method"] == "lexical token-F1"
    assert "Over-refusal rate" in result.output


def test_eval_command_reports_bad_model_without_traceback(tmp_path):
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "missing"), "--n", "1"])
    assert result.exit_code == 1
    assert "does not exist" in result.output
    assert "Traceback" not in result.output
