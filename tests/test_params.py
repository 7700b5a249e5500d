"""Method parameters are checked when a method is built, before any work: a typo in a choice
names the parameter and its allowed values instead of falling to another branch, and a
method name cannot be registered twice (issue 20)."""

from __future__ import annotations

import importlib
import typing

import pytest

from ccds import CcdsError, Example, Target
from ccds.score import REGISTRY, get_method, run
from ccds.score.base import Method

CHOICES = [  # method, parameter, typo, what the message must list
    ("bm25", "query", "prompts", ["'prompt'", "'full'"]),
    ("bm25", "reduce", "maximum", ["'mean'", "'max'"]),
    ("embed", "text", "ful", ["'prompt'", "'full'"]),
    ("embed", "reduce", "avg", ["'mean'", "'max'"]),
    ("ppl", "variant", "lo", ["'low'", "'mid'", "'high'", "'least_confidence'"]),
    ("less", "reduce", "maxx", ["'mean'", "'max'"]),
    ("s2l", "backend", "faiz", ["'auto'", "'faiss'", "'sklearn'"]),
    ("facility_location", "checkpoint", 3, ["0 or -1"]),
    ("least_confidence", "checkpoint", 12, ["-12..11"]),
    ("mid_ppl", "checkpoint", -13, ["-12..11"]),
    ("curriculum", "checkpoint", 12, ["-12..11"]),
    ("learnability", "late", 12, ["-12..11"]),
    ("cascade", "cheap", "bm26", ["bm25", "ppl", "s2l"]),
    ("cascade", "expensive", "pl", ["bm25", "ppl", "s2l"]),
]

RANGES = [  # values the old, unconstrained fields accepted
    ("random", "seed", -1), ("bm25", "b", 1.5), ("bm25", "k1", -1.0),
    ("bm25", "epsilon", -0.1), ("embed", "batch_size", 0), ("embed", "max_len", 0),
    ("embed", "block", 0), ("ppl", "val_epochs", 0), ("ppl", "val_lr", -1e-4),
    ("ppl", "max_len", 4), ("ppl", "batch_tokens", 0), ("less", "lr", 0),
    ("less", "lora_r", 0), ("less", "lora_alpha", 0), ("less", "max_len", 4),
    ("s2l", "max_len", 4), ("s2l", "batch_tokens", 0),
]


@pytest.mark.parametrize(("name", "param", "bad", "allowed"), CHOICES)
def test_a_bad_choice_names_the_parameter_and_the_allowed_values(name, param, bad, allowed):
    with pytest.raises(CcdsError, match=f"bad parameter {param} for method '{name}'") as e:
        get_method(name, **{param: bad})
    assert all(a in str(e.value) for a in allowed), str(e.value)


@pytest.mark.parametrize(("name", "param", "bad"), RANGES)
def test_a_number_out_of_range_is_rejected_at_construction(name, param, bad):
    with pytest.raises(CcdsError, match=f"bad parameter {param} for method '{name}'"):
        get_method(name, **{param: bad})


def test_checkpoint_range_follows_the_trajectory_length():
    assert get_method("least_confidence", checkpoints=3, checkpoint=-3).params.checkpoint == -3
    with pytest.raises(CcdsError, match="bad parameter checkpoint .* -3..2"):
        get_method("least_confidence", checkpoints=3, checkpoint=3)


def test_no_choice_is_a_bare_string():
    """Only open-ended names (models, sub-methods) may be any string."""
    open_ended = {"model", "proxy", "tokenizer", "cheap", "expensive"}
    bare = [f"{n}.{f}" for n, m in REGISTRY.items() for f, info in m.Params.model_fields.items()
            if info.annotation is str and f not in open_ended]
    assert bare == []
    assert typing.get_args(REGISTRY["bm25"].Params.model_fields["query"].annotation) == (
        "prompt", "full")


def test_less_bad_reduce_fails_before_any_model_is_loaded(monkeypatch):
    import ccds.score.less as less

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(less, "load_causal_lm", no_model)
    pool = [Example("p0", "one", "1"), Example("p1", "two", "2")]
    target = Target("t", [Example("v", "three", "3")], [Example("w", "four", "4")])
    with pytest.raises(CcdsError, match="bad parameter reduce for method 'less'"):
        run(get_method("less", reduce="maxx"), pool, target, cache=None)


def test_a_second_method_under_a_taken_name_is_an_error():
    import ccds.score.random as random_method

    importlib.reload(random_method)  # the same class defined again replaces itself
    assert REGISTRY["random"] is random_method.Random
    with pytest.raises(TypeError, match="'bm25' is taken by ccds.score.bm25.BM25"):
        class Other(Method):
            name = "bm25"
    assert REGISTRY["bm25"].__module__ == "ccds.score.bm25"
