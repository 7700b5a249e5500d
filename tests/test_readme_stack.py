"""The README's "With your own training stack" section, run as written: its bash blocks select
with ccds, train with TRL's `trl sft`, evaluate with lm-eval and analyse with ccds, here with
$MODEL a tiny random Llama, $POOL and $TARGET a synthetic pool and target, and $TASKS a local
lm-eval task on that target's test questions (found through $LM_EVAL_ARGS's --include_path)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import ccds

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## With your own training stack"
TASK = """\
task: ccds_dates
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{choices.index(answer)}}}}"
metric_list:
  - metric: acc
"""


def section_blocks() -> list[str]:
    text = README.read_text()
    assert text.count(f"\n{SECTION}\n") == 1, f"README: no single '{SECTION}' section"
    body = text.split(f"\n{SECTION}\n", 1)[1].split("\n## ", 1)[0]
    assert "```python" not in body, "a python block here would go untested"
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def test_section_names_each_stack():
    script = "\n".join(section_blocks())
    for command in ("ccds select", "--format messages", "trl sft", "lm_eval", "ccds analyze"):
        assert command in script, f"README's stack section lost `{command}`"


@pytest.mark.slow
def test_stack_section_runs_as_written(tmp_path, tiny_model_dir):
    assert ccds("data", "synth", "--out", tmp_path / "synth", "--n-pool", "200",
                "--n-test", "8").returncode == 0
    target = tmp_path / "synth" / "targets" / "synth-dates"
    task = tmp_path / "lm-eval-tasks"
    task.mkdir()
    rows = [json.loads(line) for line in (target / "test.jsonl").read_text().splitlines()]
    (task / "dates.jsonl").write_text("".join(
        json.dumps({k: r[k] for k in ("prompt", "choices", "answer")}) + "\n" for r in rows))
    (task / "ccds_dates.yaml").write_text(TASK.format(data=task / "dates.jsonl"))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "CCDS_PROGRESS": "0", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MODEL": str(tiny_model_dir), "TASKS": "ccds_dates",
           "POOL": str(tmp_path / "synth" / "pool.jsonl"), "TARGET": str(target),
           "TRL_ARGS": "--use_cpu --report_to none",
           "LM_EVAL_ARGS": f"--include_path {task} --device cpu --batch_size 8"}
    outs = []
    for block in section_blocks():  # in order, each as its own script: a failure names it
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env,
                           capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, f"README block failed:\n{block}\n{r.stdout}\n{r.stderr[-4000:]}"
        outs.append(r.stdout)
    out = outs[-1]
    assert "2 runs" in out.splitlines()[0], out
    for run in ("bm25-5", "random-5"):
        line = next(ln for ln in out.splitlines() if f"runs/{run})" in ln)
        assert "FLOPs ccds (lora" in line, line
    report = work / "ccds-runs-report"
    fits = json.loads((report / "fits.json").read_text())
    assert [c["run"] for c in fits["trainer_total_flos"]] == ["bm25 5.0%", "random 5.0%"]
    for c in fits["trainer_total_flos"]:  # T is what the Trainer counted, not re-estimated
        (state,) = (work / c["trainer_dir"]).glob("checkpoint-*/trainer_state.json")
        assert c["tokens"] == json.loads(state.read_text())["num_input_tokens_seen"] > 0
    assert (report / "report.md").is_file() and (report / "runs.csv").is_file()
