"""Few-shot prompting: prompt construction, the budget, and log-likelihood ranking checked
against a plain NumPy recomputation from the model's logits."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from kiln import defaults, models, prompting
from kiln.data import tasks
from kiln.errors import KilnError


class CharTok:
    """One id per ASCII character (ord), bos 1, eos 2: enough to check the prompt and scoring."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(int(i)) for i in ids if int(i) > 2)


def _task() -> tasks.Task:
    train = [tasks.Example(f"t{i}", f"text {i}", "pos" if i % 2 else "neg") for i in range(6)]
    test = [tasks.Example("q0", "query one", "pos"), tasks.Example("q1", "query two", "neg")]
    return tasks.Task(
        "jsonl",
        "classification",
        ("neg", "pos"),
        ("accuracy",),
        "{input}",
        {"train": train, "validation": [], "test": test},
    )


def _model(family: str):
    fields = dict(vocab_size=128, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32)
    if family == "t5":
        fields.update(position="none", norm="rmsnorm", use_bias=False, tie_embeddings=False)
    model = models.build_model(defaults.model_section(family, max_len=256, **fields))
    params = model.init(jax.random.key(0), **models.example_inputs(model, 8))["params"]
    return model, nn.unbox(params)


def test_the_prompt_for_a_fixed_seed_is_exactly_this_string():
    task, tok = _task(), CharTok()
    options = prompting.Options(shots=2, seed=0)
    prompt = prompting.prompts_for(task, task.splits["test"][:1], tok, options, budget=1000)[0]
    assert prompt.text == (
        "Input: text 2\nAnswer: neg\n\nInput: text 4\nAnswer: neg\n\nInput: query one\nAnswer:"
    )
    assert prompt.ids == tok.encode(prompt.text) and prompt.shots == 2 and not prompt.cut


def test_demonstrations_are_deterministic_by_seed_and_never_the_query():
    task = _task()
    train, query = task.splits["train"], task.splits["train"][3]
    first = prompting.choose_demonstrations(train, query, 4, seed=7)
    assert first == prompting.choose_demonstrations(list(reversed(train))[::-1], query, 4, seed=7)
    assert query not in first and len({e.id for e in first}) == 4
    others = {
        tuple(e.id for e in prompting.choose_demonstrations(train, query, 4, s)) for s in range(8)
    }
    assert len(others) > 1
    with pytest.raises(KilnError, match="only 5 other examples"):
        prompting.choose_demonstrations(train, query, 6, seed=0)


def test_the_budget_drops_demonstrations_first_and_never_cuts_a_query_that_fits():
    task, tok = _task(), CharTok()
    template = prompting.template_for(task)
    query = task.splits["test"][0]
    demos = prompting.choose_demonstrations(task.splits["train"], query, 3, seed=0)
    full = prompting.build_prompt(
        task, template, {"neg": "neg", "pos": "pos"}, tok, query, demos, 10_000
    )
    query_len = len(tok.encode(prompting.query_text(template, query)))
    one_demo = query_len + len("Input: text 0\nAnswer: pos\n\n")
    for budget in range(query_len, len(full.ids) + 1):
        prompt = prompting.build_prompt(task, template, {}, tok, query, demos, budget)
        assert len(prompt.ids) <= budget and not prompt.cut
        assert prompt.text.endswith("Input: query one\nAnswer:")
        assert prompt.shots == (3 if budget >= len(full.ids) else prompt.shots)
        if budget < one_demo:
            assert prompt.shots == 0
    kept = prompting.build_prompt(task, template, {}, tok, query, demos, len(full.ids) - 1)
    assert kept.shots == 2 and kept.text == full.text.split("\n\n", 1)[1]  # The first dropped.
    cut = prompting.build_prompt(task, template, {}, tok, query, demos, query_len - 3)
    assert cut.cut and len(cut.ids) == query_len - 3 and cut.text.endswith("\nAnswer:")


def _numpy_logprob(logits: np.ndarray, targets: list[int], first: int) -> float:
    """Sum of log softmax(logits[first + j])[targets[j]], computed in NumPy float64."""
    x = logits.astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(sum(logp[first + j, t] for j, t in enumerate(targets)))


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_candidate_logprobs_equal_a_numpy_recomputation(family):
    model, params = _model(family)
    tok = CharTok()
    prompt = tok.encode("Input: a short text\nAnswer:")
    candidates = [tok.encode(" pos"), tok.encode(" negative"), tok.encode(" x")]
    got = prompting.candidate_logprobs(model, params, tok, prompt, candidates)
    normalized = prompting.candidate_logprobs(model, params, tok, prompt, candidates, True)
    want = []
    for cand in candidates:  # One unpadded forward pass per candidate.
        if family == "gpt":
            ids = np.array([[tok.bos_id, *prompt, *cand]], np.int32)
            logits = np.asarray(model.apply({"params": params}, ids))[0]
            want.append(_numpy_logprob(logits, cand, len(prompt)))
        else:
            enc = np.array([[*prompt, tok.eos_id]], np.int32)
            dec = np.array([[tok.bos_id, *cand]], np.int32)
            logits = np.asarray(model.apply({"params": params}, enc, dec))[0]
            want.append(_numpy_logprob(logits, [*cand, tok.eos_id], 0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    lengths = [len(c) + (family == "t5") for c in candidates]
    np.testing.assert_allclose(normalized, np.array(want) / lengths, rtol=1e-5, atol=1e-5)


def test_a_model_whose_logits_prefer_a_label_word_gives_that_label():
    """A gpt whose every position predicts the tokens of "pos" (final norm scale 0, bias along
    one axis that only those tokens' embeddings have) ranks "pos" first for every prompt."""
    model, params = _model("gpt")
    tok, task = CharTok(), _task()
    params["final_norm"]["scale"] = np.zeros(16, np.float32)
    params["final_norm"]["bias"] = np.eye(16, dtype=np.float32)[0]
    embed = np.array(params["token_embed"]["embedding"])
    embed[:, 0] = 0.0
    embed[tok.encode(" pos"), 0] = 8.0
    params["token_embed"]["embedding"] = embed
    for normalize in (False, True):
        options = prompting.Options(shots=1, scoring="rank", normalize=normalize)
        metrics, rows = prompting.score(model, params, task, task.splits["test"], tok, options)
        assert [r["prediction"] for r in rows] == ["pos", "pos"]
        assert metrics["accuracy"] == 0.5 and metrics["prompt_shots"] == 1.0
        assert all(r["scores"]["pos"] > r["scores"]["neg"] for r in rows)
    # The word of a label decides: "neg" spelled " pos" would now win.
    flipped = prompting.Options(scoring="rank", label_words="neg=pos,pos=no")
    _, rows = prompting.score(model, params, task, task.splits["test"], tok, flipped)
    assert [r["prediction"] for r in rows] == ["neg", "neg"]


def test_bad_options_and_words_fail_clearly():
    task = _task()
    with pytest.raises(KilnError, match="scoring='vote' is not one of generate, rank"):
        prompting.Options(scoring="vote")
    with pytest.raises(KilnError, match="has no {input} placeholder"):
        prompting.Options(template="Answer:")
    with pytest.raises(KilnError, match="'maybe=x' is not 'label=word' with a label"):
        prompting.label_words(task, "maybe=x")
    with pytest.raises(KilnError, match="two labels the same word"):
        prompting.label_words(task, "neg=pos")
    regression = tasks.Task("jsonl", "regression", (), ("mse",), "{input}", task.splits)
    model, params = _model("gpt")
    with pytest.raises(KilnError, match="regression task: prompting scores text"):
        prompting.score(model, params, regression, [], CharTok(), prompting.Options())
    generation = tasks.Task("jsonl", "generation", (), ("chrf",), "{input}", task.splits)
    with pytest.raises(KilnError, match="ranks label words"):
        prompting.score(
            model,
            params,
            generation,
            task.splits["test"],
            CharTok(),
            prompting.Options(scoring="rank"),
        )
