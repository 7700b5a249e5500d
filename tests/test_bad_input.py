"""The bad-input catalogue (issue 9): each case is one clear line on stderr, exit code 2, no
traceback, and no output file left behind. Cases needing no model run in seconds."""

import json
import math

import pytest
from conftest import build_tiny_llama
from test_cli import ccds, one_error_line

GOOD = [{"id": f"e{i}", "prompt": f"question {i}", "response": f"answer {i}"}
        for i in range(20)]


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def select(pool, out, *extra):
    return ("select", "--pool", pool, "--out", out, *(extra or ("--count", "3")))


def sweep_yaml(tmp, **over):
    import yaml

    cfg = {"out": str(tmp / "sweep"), "methods": ["random"], "fractions": [0.5]}
    cfg.update(over)
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    return ("sweep", "run", tmp / "sweep.yaml")


def make_target(tmp, val_rows):
    d = tmp / "target"
    d.mkdir()
    (d / "target.json").write_text('{"name": "t", "metric": "nll", "extract": "text"}')
    jsonl(d / "val.jsonl", val_rows)
    jsonl(d / "test.jsonl", GOOD[:2])
    return d


def plan(*extra, **sizes):
    sizes = {"budget": "1e18", "train-model": "7e9", "selection-model": "7e9",
             "pool-tokens": "1e8", **sizes}
    return ("plan", *(x for k, v in sizes.items() for x in (f"--{k}", v)), *extra)


def nan_scores(tmp, pool):
    import numpy as np

    from ccds.flops import Stage
    from ccds.score.base import Scores, write_scores

    v = np.zeros(20)
    v[3] = math.nan
    write_scores(tmp / "s.parquet", Scores("random", v, [r["id"] for r in GOOD],
                                           Stage("s", "selection")))
    return tmp / "s.parquet"


# (name, build(tmp, pool, out) -> argv, needles on the error line)
CASES = [
    ("missing pool file", lambda t, p, o: select(t / "nope.jsonl", o), ["nope.jsonl"]),
    ("malformed JSON line", lambda t, p, o: select(jsonl(t / "b.jsonl", [GOOD[0], '{"prompt":']),
                                                   o), ["b.jsonl:2", "malformed JSON"]),
    ("a line that is not an object", lambda t, p, o: select(jsonl(t / "b.jsonl", ["[1, 2]"]), o),
     ["b.jsonl:1"]),
    ("wrong type for prompt", lambda t, p, o: select(
        jsonl(t / "b.jsonl", [{"prompt": {"x": 1}, "response": "r"}]), o), ["b.jsonl:1"]),
    ("missing fields", lambda t, p, o: select(jsonl(t / "b.jsonl", [{"text": "x"}]), o),
     ["b.jsonl:1"]),
    ("empty response", lambda t, p, o: select(
        jsonl(t / "b.jsonl", [{"prompt": "p", "response": " "}]), o), ["empty response"]),
    ("empty prompt and response", lambda t, p, o: select(
        jsonl(t / "b.jsonl", [{"prompt": "", "response": ""}]), o), ["b.jsonl:1"]),
    ("non-UTF-8 bytes", lambda t, p, o: (t / "b.jsonl").write_bytes(
        b'{"prompt": "\xff\xfe", "response": "r"}\n') and select(t / "b.jsonl", o),
     ["b.jsonl", "UTF-8"]),
    ("a 10 MB example", lambda t, p, o: select(jsonl(t / "b.jsonl", [GOOD[0], {
        "prompt": "x" * 10_000_000, "response": "r"}]), o), ["b.jsonl:2", "MB"]),
    ("duplicate ids", lambda t, p, o: select(jsonl(t / "b.jsonl", [GOOD[0], GOOD[0]]), o),
     ["duplicate id", "b.jsonl:2"]),
    ("empty pool", lambda t, p, o: select(jsonl(t / "b.jsonl", []), o), ["empty"]),
    ("unknown pool format", lambda t, p, o: select((t / "b.csv").write_text("a,b") and
                                                   t / "b.csv", o), ["b.csv"]),
    ("target with no validation examples", lambda t, p, o: select(
        p, o, "--count", "3", "--method", "bm25", "--target", make_target(t, [])),
     ["validation"]),
    ("unknown target", lambda t, p, o: select(p, o, "--count", "3", "--target", "nope"),
     ["unknown target"]),
    ("unknown method", lambda t, p, o: select(p, o, "--count", "3", "--method", "magic"),
     ["unknown selection method"]),
    ("unknown method parameter", lambda t, p, o: select(p, o, "--count", "3", "--method",
                                                        "bm25", "--param", "k9=1"), ["k9"]),
    ("method parameter of the wrong type", lambda t, p, o: select(
        p, o, "--count", "3", "--method", "bm25", "--param", "k1=high"), ["k1"]),
    ("malformed --param", lambda t, p, o: select(p, o, "--count", "3", "--param", "oops"),
     ["--param"]),
    ("method needs a target", lambda t, p, o: select(p, o, "--count", "3", "--method", "bm25"),
     ["needs a target"]),
    ("fraction 0", lambda t, p, o: select(p, o, "--fraction", "0"), ["(0, 1]"]),
    ("fraction above 1", lambda t, p, o: select(p, o, "--fraction", "1.5"), ["(0, 1]"]),
    ("negative count", lambda t, p, o: select(p, o, "--count", "-2"), ["count"]),
    ("two budgets at once", lambda t, p, o: select(p, o, "--count", "2", "--fraction", "0.1"),
     ["exactly one"]),
    ("scores with NaN", lambda t, p, o: select(p, o, "--count", "3", "--scores",
                                               nan_scores(t, p)), ["NaN"]),
    ("scores from another pool", lambda t, p, o: select(
        jsonl(t / "b.jsonl", GOOD[:5]), o, "--count", "3", "--scores", nan_scores(t, p)),
     ["does not match"]),
    ("unknown model", lambda t, p, o: ("train", "--data", p, "--out", o, "--model",
                                       "no-such-model"), ["unknown model"]),
    ("model folder without a tokenizer", lambda t, p, o: (t / "m").mkdir() or (
        "train", "--data", p, "--out", o, "--model", t / "m"), ["m"]),
    ("tokenizer and model mismatch", lambda t, p, o: (
        "train", "--data", p, "--out", o, "--model", build_tiny_llama(t / "m", vocab_size=100)),
     ["49152 tokens", "100 rows"]),
    ("malformed YAML", lambda t, p, o: (t / "c.yaml").write_text("lr: [1, 2\n") and (
        "train", "--data", p, "--out", o, "--config", t / "c.yaml"), ["malformed YAML"]),
    ("YAML that is not a mapping", lambda t, p, o: (t / "c.yaml").write_text("- 1\n") and (
        "train", "--data", p, "--out", o, "--config", t / "c.yaml"), ["mapping"]),
    ("sweep: unknown key", lambda t, p, o: sweep_yaml(t, colour="red"), ["colour"]),
    ("sweep: fraction out of range", lambda t, p, o: sweep_yaml(t, fractions=[0.1, 2.0]),
     ["fractions"]),
    ("sweep: unknown method", lambda t, p, o: sweep_yaml(t, methods=["magic"]),
     ["unknown method"]),
    ("sweep: no methods", lambda t, p, o: sweep_yaml(t, methods=[]), ["methods"]),
    ("sweep: misspelt training setting",
     lambda t, p, o: sweep_yaml(t, train={"lr": 1e-3, "epoch": 2}), ["train.epoch"]),
    ("sweep: misspelt evaluation setting",
     lambda t, p, o: sweep_yaml(t, eval={"max_new_token": 8}), ["eval.max_new_token"]),
    ("sweep: unknown synthetic target", lambda t, p, o: sweep_yaml(t, targets=["nope"]),
     ["nope"]),
    ("plan: negative budget", lambda t, p, o: ("plan", "--budget", "-1", "--train-model", "7e9",
                                               "--selection-model", "7e9", "--pool-tokens",
                                               "1e8"), ["positive"]),
    ("FLOPs budget below the selection cost", lambda t, p, o: select(
        p, o, "--method", "bm25", "--target", make_target(t, GOOD[:3]), "--flops", "5"),
     ["5.000e+00", "selection cost"]),
    ("FLOPs budget too small to train on anything", lambda t, p, o: select(
        p, o, "--flops", "1000"), ["1.000e+03", "one token"]),
    ("plan: missing sizes", lambda t, p, o: ("plan", "--budget", "1e18"), ["--train-model"]),
    ("analyze: no run store", lambda t, p, o: ("analyze", t), ["run store"]),
    ("build-pool: unknown source", lambda t, p, o: ("data", "build-pool", "--source",
                                                    "nosuch@3", "--out", o),
     ["unknown source 'nosuch'", "gsm8k", "alpaca"]),
    # issue 20: typer's own errors, corrupt inputs, sizes as people type them
    ("plan: budget not a number", lambda t, p, o: plan(budget="abc"), ["'--budget'", "number"]),
    ("plan: NaN budget", lambda t, p, o: plan(budget="nan"), ["positive"]),
    ("plan: a size that is neither a count nor a model", lambda t, p, o: plan(
        **{"train-model": "7X"}), ["'7X'", "1.5B", "smollm2-135m"]),
    ("plan: pool tokens not a number", lambda t, p, o: plan(**{"pool-tokens": "lots"}),
     ["--pool-tokens 'lots'", "135M"]),
    ("plan: fits file not from analyze", lambda t, p, o: plan(
        "--fits", (t / "f.json").write_text("[1, 2]") and t / "f.json"),
     ["f.json", "not a fits file"]),
    ("plan: unknown prior", lambda t, p, o: plan("--prior", "mine"), ["'--prior'", "paper"]),
    ("unknown command", lambda t, p, o: ("selekt", "--pool", p), ["selekt"]),
    ("unknown option", lambda t, p, o: select(p, o, "--count", "3", "--frac", "0.1"),
     ["--frac"]),
    ("integer option not a number", lambda t, p, o: select(p, o, "--count", "three"),
     ["'--count'", "integer"]),
    ("analyze: run store that is not a database", lambda t, p, o: (
        (t / "runs.sqlite").write_text("not sqlite") and ("analyze", t)), ["not a database"]),
    ("analyze: unknown sharing", lambda t, p, o: ("analyze", t, "--share", "all"),
     ["'--share'", "pbar_p0"]),
    ("cost: fractions not numbers", lambda t, p, o: ("cost", "--pool", p, "--fractions",
                                                     "5%,10%"), ["--fractions"]),
    ("cost: negative epochs", lambda t, p, o: ("cost", "--pool", p, "--epochs", "-1"),
     ["--epochs"]),
    ("compare: figure format", lambda t, p, o: ("data", "compare", "--pool", p, "--subset",
                                                f"a={p}", "--out", o.with_suffix(".txt")),
     ["o.txt", ".png"]),
    ("score: shard size 0", lambda t, p, o: ("score", "--pool", p, "--out", o, "--shard-size",
                                             "0"), ["shard_size"]),
    ("select: missing scores file", lambda t, p, o: select(p, o, "--count", "3", "--scores",
                                                           t / "s.parquet"),
     ["s.parquet", "no such scores file"]),
    ("select: scores of another method", lambda t, p, o: select(
        p, o, "--count", "3", "--method", "bm25", "--scores", nan_scores(t, p)),
     ["random scores, not bm25"]),
    ("select: FLOPs budget not finite", lambda t, p, o: select(p, o, "--flops", "inf"),
     ["inf", "finite"]),
    ("demo: fraction above 1", lambda t, p, o: ("demo", "--out", o, "--fraction", "2"),
     ["fraction"]),
    ("compare: missing subset", lambda t, p, o: ("data", "compare", "--pool", p, "--subset",
                                                 f"a={t / 'none.jsonl'}", "--out",
                                                 t / "c.png"), ["none.jsonl"]),
]


@pytest.mark.parametrize("name,build,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, build, needles, tmp_path):
    pool = jsonl(tmp_path / "pool.jsonl", GOOD)
    out = tmp_path / "out" / "o.jsonl"
    argv = build(tmp_path, pool, out)
    one_error_line(ccds(*argv), *needles)
    assert not out.exists() and not (tmp_path / "out").exists() or not any(
        (tmp_path / "out").iterdir())


def test_catalogue_is_large_enough(figure):
    figure("bad inputs in the CLI catalogue", len(CASES))
    assert len(CASES) >= 30


def test_disk_full_leaves_nothing_half_written(tmp_path, monkeypatch):
    """A write that fails midway (ENOSPC) is one error line and no partial output file."""
    import errno

    from ccds import io as cio

    pool = jsonl(tmp_path / "pool.jsonl", GOOD)
    real = cio.os.replace

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cio.os, "replace", full)
    r = ccds(*select(pool, tmp_path / "o.jsonl"))
    monkeypatch.setattr(cio.os, "replace", real)
    one_error_line(r, "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.jsonl"]
