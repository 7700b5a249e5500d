"""`ccds run` (issue 29): one budget spent end to end — pilot on V, decision, selection,
training — with every FLOP charged and the charged total never over the budget."""

import json

import pytest
from test_cli import ccds, one_error_line

from ccds.decide import Arm, adaptive


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("spend")
    assert ccds("data", "synth", "--out", d, "--n-pool", "80", "--n-val", "8",
                "--n-test", "10").returncode == 0
    return d


def run(synth, model, out, budget, *extra):
    return ccds("run", "--pool", synth / "pool.jsonl", "--target",
                synth / "targets" / "synth-arithmetic", "--model", model, "--budget",
                str(budget), "--out", out, "--method", "random", "--method", "bm25",
                "--method", "dsir", "--seed", "0", *extra)


@pytest.mark.parametrize("scale", [0.05, 0.6, 3.0])
def test_run_charges_every_flop_and_stays_within_budget(synth, tiny_model_dir, tmp_path,
                                                        scale):
    """At budgets from a twentieth of full training to three times it, the ledger (analytic
    and measured, which agree within 5%) is within B, the decision and the final T result
    are reported, and the adapter is beside them."""
    from ccds.data.formats import load_examples
    from ccds.train import TrainConfig, training_cost

    c_full = training_cost(load_examples(synth / "pool.jsonl"),
                           TrainConfig(model=str(tiny_model_dir))).analytic
    budget = scale * c_full  # the subset is written for TRL/open-instruct, with its sidecar
    r = run(synth, str(tiny_model_dir), tmp_path / "out", budget, "--format", "messages")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    from ccds.data.formats import check_sidecar, load_examples
    from ccds.score.base import examples_hash

    side = check_sidecar(tmp_path / "out" / "subset.jsonl",
                         examples_hash(load_examples(synth / "pool.jsonl")))
    assert side["ids"] == rep["final"]["ids"] and side["format"] == "messages"
    first = json.loads((tmp_path / "out" / "subset.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert rep["within_budget"] and rep["charged_flops"] <= budget
    assert rep["charged_measured_flops"] <= budget  # padding included, as it ran
    assert rep["charged_measured_flops"] == pytest.approx(rep["charged_flops"], rel=0.05)
    kinds = {s["kind"] for s in rep["ledger"]["stages"]}
    assert "training" in kinds
    assert all(s["detail"].get("on") == "V" for s in rep["ledger"]["stages"]
               if s["kind"] == "evaluation")  # T's evaluation is reported, not charged
    assert rep["reported"]["stages"][0]["detail"]["target"] == "synth-arithmetic"
    assert (tmp_path / "out" / "final" / "adapter" / "adapter_model.safetensors").exists()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Decision" in md and "within budget: True" in md
    if scale >= 3.0:  # the budget buys a pilot: arms on V, P0, each with its cost
        d = rep["decision"]
        assert d["arms"] and d["p0"] is not None and d["pilot_flops"] <= d["pilot_budget"]


def test_a_budget_that_trains_nothing_names_the_smallest_that_would(synth, tiny_model_dir,
                                                                    tmp_path):
    r = run(synth, str(tiny_model_dir), tmp_path / "out", 1e3)
    line = one_error_line(r)
    assert "trains on nothing" in line and "smallest budget" in line
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.parametrize(("args", "says"), [
    (("--unit", "gpu-hours"), "needs --device"),
    (("--unit", "parsecs"), "parsecs"),
    (("--unit", "hours", "--mfu", "0.5"), "--mfu prices GPU-hours"),
])
def test_bad_units_are_one_line(synth, tmp_path, args, says):
    r = run(synth, "smollm2-135m", tmp_path / "out", 1e15, *args)
    assert says in one_error_line(r)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


class _Toy:
    """A world where every method trains alike and V is exact: the rule must stay within
    budget whatever it decides."""

    def __init__(self, sel, c_full=100.0, v=1.0):
        self.sel, self.c_full, self.v, self.fractions, self.spent = sel, c_full, v, None, 0.0
        self.paid = set()

    def selection_cost(self, m):
        return 0.0 if m in self.paid else self.sel[m]

    def training_cost(self, m, f):
        return f * self.c_full

    def eval_cost(self):
        return self.v

    def zero_shot(self):
        self.spent += self.v
        return -2.0, 0.01

    def trial(self, m, f):
        c = self.selection_cost(m) + f * self.c_full + self.v
        self.spent += c
        self.paid.add(m)
        return Arm(m, f, c, -2.0 + (1 - 2.718 ** (-3 * f)) * (1 + 0.1 * len(m)), 0.01)


@pytest.mark.parametrize("budget", [0.5, 3.0, 20.0, 90.0, 300.0, 5000.0])
def test_the_rule_never_plans_past_the_budget(budget):
    w = _Toy({"random": 0.0, "bm25": 0.1, "embed": 5.0, "ppl": 40.0})
    d = adaptive(w, budget, list(w.sel), {"random": 2.0, "bm25": 4.0, "embed": 6.0,
                                          "ppl": 8.0})
    if d.method is not None:
        final = w.selection_cost(d.method) + w.training_cost(d.method, d.fraction)
        assert w.spent + final <= budget * (1 + 1e-12)
        assert w.spent - 0 <= budget
    assert d.pilot_flops <= max(d.pilot_budget, 0.0) + 1e-9


def test_killed_again_and_again_it_ends_as_an_uninterrupted_run(synth, tiny_model_dir,
                                                                 tmp_path, figure):
    """SIGKILL at random moments (pilot arms, scoring, the final training), rerun the same
    command: it picks up where it stopped and ends with the uninterrupted run's decision,
    charge and T result."""
    import os
    import subprocess
    import sys

    from conftest import kill_until_done

    from ccds.data.formats import load_examples
    from ccds.train import TrainConfig, training_cost

    cfg = tmp_path / "run.yaml"
    cfg.write_text("train: {dtype: fp32, checkpoints: 12, batch_tokens: 256}\n")
    budget = 3 * training_cost(load_examples(synth / "pool.jsonl"),
                               TrainConfig(model=str(tiny_model_dir))).analytic

    def start(out):
        return subprocess.Popen(
            [sys.executable, "-m", "ccds", "run", "--pool", str(synth / "pool.jsonl"),
             "--target", str(synth / "targets" / "synth-arithmetic"), "--model",
             str(tiny_model_dir), "--budget", str(budget), "--out", str(out), "--config",
             str(cfg), "--method", "random", "--method", "bm25", "--method", "dsir"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "CCDS_PROGRESS": "0"})

    p = start(tmp_path / "ref")
    assert p.wait(timeout=600) == 0, p.stderr.read()

    def done():
        k = tmp_path / "k"
        return (len(list((k / "pieces").glob("*.json"))) + len(list(k.glob("scores/*")))
                + len(list((k / "final").glob("checkpoint-*"))))

    p, seen = kill_until_done(lambda: start(tmp_path / "k"), done, steps=(1, 2))
    assert p.returncode == 0, p.stderr.read()
    figure("ccds run: SIGKILLs survived (pieces saved at each)", f"{len(seen)} {seen}")
    assert len(seen) >= 2, seen
    ref, got = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("ref", "k"))
    assert got["charged_flops"] == ref["charged_flops"] <= budget
    for key in ("method", "fraction", "arms", "reason"):
        assert got["decision"][key] == ref["decision"][key], key
    assert got["final"]["ids"] == ref["final"]["ids"]
    assert got["final"]["T"]["nll"] == pytest.approx(ref["final"]["T"]["nll"], rel=1e-6)


def test_a_budget_in_hours_is_priced_from_this_machines_measured_throughput(
        synth, tiny_model_dir, tmp_path):
    """--unit hours without a GPU: a charged calibration (zero-shot on V, a short training)
    measures FLOP/s; the report gives the budget's seconds, the charged work's predicted
    seconds and the actual ones."""
    r = run(synth, str(tiny_model_dir), tmp_path / "out", 0.003, "--unit", "hours")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    w = rep["wall"]
    assert "measured on this machine" in w["rate"] and w["calibration_s"] > 0
    assert w["predicted_s"] == pytest.approx(0.003 * 3600)
    assert w["actual_s"] > 0 and w["charged_predicted_s"] > 0
    assert rep["charged_flops"] <= rep["budget_flops"]
    assert "Wall clock" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("seed", range(4))
def test_random_pools_and_budgets_never_exceed_the_budget(tiny_model_dir, tmp_path, seed):
    """Property: over random synthetic pools (size, seed), budgets (log-uniform from a few
    examples' training to several C_full), pilot shares and method sets, the charged total
    never passes B."""
    import numpy as np

    from ccds.data.formats import load_examples
    from ccds.train import TrainConfig, training_cost

    rng = np.random.default_rng(seed)
    d = tmp_path / "data"
    assert ccds("data", "synth", "--out", d, "--n-pool", int(rng.integers(30, 120)), "--seed",
                seed, "--n-val", int(rng.integers(2, 10)), "--n-test", "4").returncode == 0
    c_full = training_cost(load_examples(d / "pool.jsonl"),
                           TrainConfig(model=str(tiny_model_dir))).analytic
    budget = c_full * float(np.exp(rng.uniform(np.log(0.02), np.log(4.0))))
    methods = list(rng.choice(["random", "bm25", "dsir", "embed"], size=int(rng.integers(1, 4)),
                              replace=False))
    r = ccds("run", "--pool", d / "pool.jsonl", "--target", d / "targets" / "synth-boolean",
             "--model", tiny_model_dir, "--budget", budget, "--out", tmp_path / "out",
             "--pilot-share", float(rng.uniform(0.05, 0.5)), "--seed", seed,
             *[x for m in methods for x in ("--method", m)])
    if r.returncode == 2:  # a budget below one example's training: said, nothing written
        assert "trains on nothing" in one_error_line(r)
        assert not (tmp_path / "out" / "report.json").exists()
        return
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["charged_flops"] <= budget and rep["within_budget"]
    assert rep["charged_measured_flops"] <= budget
    assert rep["decision"]["pilot_flops"] <= rep["decision"]["pilot_budget"] + 1e-6


def test_a_target_without_v_is_one_line_and_writes_nothing(synth, tmp_path):
    import shutil

    t = tmp_path / "t"
    shutil.copytree(synth / "targets" / "synth-arithmetic", t)
    (t / "val.jsonl").write_text("")
    r = ccds("run", "--pool", synth / "pool.jsonl", "--target", t, "--budget", "1e15",
             "--out", tmp_path / "out")
    assert "no validation examples" in one_error_line(r)
    assert not (tmp_path / "out").exists()


class _Overrun(_Toy):
    """Work measured 3% above its price, as padded batches are."""

    def zero_shot(self):
        self.spent += 1.03 * self.v
        self.p0_called = True
        return -2.0, 0.01

    def trial(self, m, f):
        arm = super().trial(m, f)
        self.spent += 0.03 * arm.flops
        return arm


@pytest.mark.parametrize("budget", [60.0, 100.0, 150.0, 400.0])
def test_a_pilot_that_measures_p0_also_runs_its_arms(budget):
    """A pilot sized to the last FLOP would stop after P0 when work runs a few percent over
    its price (a live GSM8K run did): the zero-shot evaluation is only paid for arms."""
    w = _Overrun({"random": 0.0, "bm25": 0.1, "dsir": 0.2})
    d = adaptive(w, budget, list(w.sel), {"random": 2.0, "bm25": 4.0})
    assert bool(d.arms) == getattr(w, "p0_called", False)
    assert w.spent <= budget


def test_the_config_file_is_not_overwritten_by_option_defaults(synth, tiny_model_dir, tmp_path):
    """Settings in --config (strategy, pilot share, seed) hold unless given on the line."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("strategy: plan\npilot_share: 0.3\nseed: 3\n")
    r = ccds("run", "--pool", synth / "pool.jsonl", "--target",
             synth / "targets" / "synth-arithmetic", "--model", tiny_model_dir, "--budget",
             "1e11", "--out", tmp_path / "out", "--config", cfg)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["decision"]["strategy"] == "plan"
    assert (rep["config"]["pilot_share"], rep["config"]["seed"]) == (0.3, 3)
