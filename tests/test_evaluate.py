import pytest

from ccds import Example, Target
from ccds.evaluate import EvalConfig, answers_match, evaluate, extract
from ccds.flops import Ledger
from ccds.models import pick_runtime


@pytest.mark.parametrize("text,how,want", [
    ("She has 3 + 4 = 7 apples.\n#### 1,234", "number", "1234"),
    ("3 + 4 = 7, then 7 * 2 = 14. The answer is 14.", "number", "14"),
    ("The answer is $1,500.00 total, from 3 boxes", "number", "1500"),
    ("It costs 2.50 each, 4 of them: 10.5", "number", "10.5"),
    ("no digits here", "number", ""),
    ("Let's think step by step. ... So the answer is (B).", "first_line", "(B)"),
    ("valid\nbecause the premises hold", "first_line", "valid"),
    ("  Monday  ", "text", "Monday"),
])
def test_extract(text, how, want):
    assert extract(text, how) == want


def test_answers_match_normalises():
    assert answers_match("14", "14.0") and answers_match("Valid.", "valid")
    assert answers_match("(B)", "(b)") and not answers_match("13", "14")


def test_mc_accuracy_nll_and_flops_on_real_smollm2(smollm2):
    """Real model on questions it knows: gold options win and the ledger is consistent."""
    model, tok, _ = smollm2
    qs = [("What is the capital of France?", ["Paris", "Tokyo", "Cairo"], "Paris"),
          ("What colour is the sky on a clear day?", ["Green", "Blue", "Red"], "Blue"),
          ("How many legs does a dog have?", ["Four", "Nine", "Seventeen"], "Four"),
          ("Which animal says 'meow'?", ["A cow", "A cat", "A fish"], "A cat")]
    test = [Example(f"q{i}", f"{q}\nOptions: {', '.join(ch)}.\nAnswer with one option only.",
                    gold, choices=ch) for i, (q, ch, gold) in enumerate(qs)]
    target = Target("trivia", test[:1], test, metric="mc")
    ledger = Ledger()
    r = evaluate(model, tok, target, EvalConfig(), runtime=pick_runtime(), ledger=ledger,
                 progress=None)
    assert r["accuracy"] >= 0.75 and r["primary"] == r["accuracy"]
    assert 0 < r["nll"] < 5
    st = ledger.stages[0]
    assert abs(st.analytic_flops / st.measured_flops - 1) < 0.1


def test_exact_match_generation_and_shots(tiny):
    """A tiny random model: generation runs batched, counts FLOPs, and is scored."""
    model, tok, _ = tiny
    test = [Example(f"t{i}", f"Say {i}.", f"{i}", answer=str(i)) for i in range(5)]
    target = Target("say", test[:2], test, metric="exact", extract="number")
    ledger = Ledger()
    cfg = EvalConfig(shots=2, max_new_tokens=4, measure_generation=True)
    r = evaluate(model, tok, target, cfg, runtime=pick_runtime(), ledger=ledger, progress=None)
    assert r["shots"] == 2 and r["n"] == 5 and 0 <= r["exact_match"] <= 1
    assert len(r["samples"]) == 3
    gen = [s for s in ledger.stages if s.name.startswith("generate")][0]
    assert gen.analytic_flops > 0 and gen.measured_flops > 0
    assert abs(gen.analytic_flops / gen.measured_flops - 1) < 0.25


def test_nll_is_per_example_mean(tiny):
    model, tok, _ = tiny
    test = [Example("a", "x", "short"), Example("b", "y", "a much longer answer " * 5)]
    r = evaluate(model, tok, Target("t", test, test), EvalConfig(), runtime=pick_runtime(),
                 progress=None)
    assert r["nll"] != pytest.approx(r["nll_token"])  # example- vs token-weighted differ


def test_one_token_options_take_one_forward_per_question(smollm2, monkeypatch):
    """MMLU-style letter answers: the shared-prompt path equals scoring every option."""
    import ccds.evaluate as ev

    model, tok, _ = smollm2
    qs = [("2 + 2 = ?", "4", "5", "C"), ("Capital of Italy?", "Rome", "Oslo", "A"),
          ("Colour of grass?", "Green", "Pink", "B")]
    test = [Example(f"q{i}", f"{q}\nA. {a}\nB. {b}\nC. none\nAnswer with the letter.", gold,
                    choices=["A", "B", "C"]) for i, (q, a, b, gold) in enumerate(qs)]
    target = Target("letters", test[:1], test, metric="mc")
    rt = pick_runtime(dtype="fp32")  # the two paths agree exactly in fp32, not in bf16
    ledger = Ledger()
    fast = evaluate(model, tok, target, EvalConfig(), runtime=rt, ledger=ledger, progress=None)
    st = ledger.stages[0]
    assert st.tokens == sum(len(x) for x in ev.encode_pairs(
        [e.prompt for e in test], [e.response for e in test], tok).ids)  # one row per question
    assert abs(st.analytic_flops / st.measured_flops - 1) < 0.1
    monkeypatch.setattr(ev, "_one_token_options", lambda *a: None)
    slow = evaluate(model, tok, target, EvalConfig(), runtime=rt, progress=None)
    assert fast["accuracy"] == slow["accuracy"]
    assert fast["nll"] == pytest.approx(slow["nll"], rel=1e-4)
