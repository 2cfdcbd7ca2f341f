"""benchmarks/gpu_check.sh reports every stage: the summary names a stage that ran out of time and how far it got."""
from __future__ import annotations

import json
import subprocess

from benchmarks.gpu_summary import main, stage_rows


def test_the_summary_names_each_stage_and_how_it_ended(tmp_path, capsys):
    stages = [{"stage": "cuda_tests", "rc": 0, "seconds": 31, "time_box_s": 60, "timed_out": False},
              {"stage": "throughput_compiled", "rc": 124, "seconds": 150, "time_box_s": 150, "timed_out": True},
              {"stage": "fid_pipeline", "rc": 1, "seconds": 3, "time_box_s": 90, "timed_out": False}]
    (tmp_path / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages) + "torn line\n")
    (tmp_path / "cuda_tests.log").write_text("....\n9 passed in 30.1s\n")
    row = {"precision": "bf16", "compile": True, "baseline_img_s": 1500.0, "td_img_s": 1150.0,
           "td_over_baseline": 1.30, "td_over_baseline_floor": 1.28, "compile_warmup_s": 61.0}
    (tmp_path / "throughput_compiled.json").write_text(json.dumps({"results": [row]}))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "9 passed" in out[0]
    assert "ran out of time" in out[1] and "bf16 compiled: baseline 1500 img/s" in out[1] and "warm-up 61 s" in out[1]
    assert "rc 1" in out[2] and "no JSON" in out[2]
    assert json.loads((tmp_path / "summary.json").read_text())["stages"] == stage_rows(tmp_path)


def test_no_stages_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1


def test_the_script_parses_and_boxes_every_stage():
    text = open("benchmarks/gpu_check.sh").read()
    assert subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"]).returncode == 0
    boxes = [int(line.split()[2]) for line in text.splitlines() if line.startswith("stage ")]
    assert len(boxes) == 6 and sum(boxes) <= 8 * 60  # the whole check within 8 minutes
