"""The plans under configs/plans/ and the loader's `extends:`: every plan loads, a plan is its base config with its
own stages, a bad `extends` is one line, and plans that share a stage name mean the same stage by it (the rule
benchmarks/front.py trains shared checkpoints by)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO, run
from yolo_tq.config import ConfigError, load_config, stage_plan

PLANS = sorted((REPO / "configs" / "plans").glob("*.yaml"))


def front_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("front", REPO / "benchmarks" / "front.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_plan_loads_and_extends_the_default_config():
    base = load_config(REPO / "configs" / "stage1_progressive.yaml")
    assert {p.stem for p in PLANS} >= {"ttq", "int4", "int2", "ttq12_int4_stage3", "ttq123_int4_rest"}
    for path in PLANS:
        cfg = load_config(path)
        assert cfg.train == base.train and cfg.distill == base.distill and cfg.quantization == base.quantization
    assert load_config(REPO / "configs" / "plans" / "ttq.yaml") == base  # the default plan, as it is
    int4 = load_config(REPO / "configs" / "plans" / "int4.yaml")
    assert [stage_plan(int4, s).spec.bits for s in int4.stages] == [4, 4, 4]
    assert [s.layers for s in int4.stages] == [s.layers for s in base.stages]


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    (tmp_path / "base.yaml").write_text("extends: plans/ttq.yaml\ntrain: {epochs: 3}\n")  # relative to the file
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "ttq.yaml").write_text(f"extends: {REPO / 'configs' / 'stage1_progressive.yaml'}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain: {batch: 4}\nstages:\n"
                                         "  - {name: only, layers: [2], weights: {kind: int, bits: 4}}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.epochs, cfg.train.batch, cfg.train.imgsz) == (3, 4, 640)
    assert [s.name for s in cfg.stages] == ["only"]


@pytest.mark.parametrize("text, needle", [("extends: missing.yaml\n", "names no file"),
                                          ("extends: self.yaml\n", "makes a loop"),
                                          ("extends: other.yaml\n", "makes a loop"),
                                          ("extends: bad.yaml\n", "unknown config key 'trian'")])
def test_bad_extends_is_one_line(tmp_path, text, needle):
    (tmp_path / "self.yaml").write_text("extends: self.yaml\n")
    (tmp_path / "other.yaml").write_text("extends: start.yaml\n")
    (tmp_path / "bad.yaml").write_text("trian: {epochs: 1}\n")
    (tmp_path / "start.yaml").write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(tmp_path / "start.yaml")


def test_shared_stage_names_mean_the_same_stage():
    front = front_module()
    plans = {p.stem: load_config(p) for p in PLANS}
    users = front.check_shared_names(plans)
    assert set(users["stage1"]) >= {"ttq", "ttq12_int4_stage3", "ttq123_int4_rest"}
    assert set(users["stage3"]) >= {"ttq", "ttq123_int4_rest"}
    changed = load_config(REPO / "configs" / "plans" / "ttq12_int4_stage3.yaml", dotlist=["stages[1].threshold=0.5"])
    with pytest.raises(SystemExit, match="'stage2' means different stages"):
        front.check_shared_names({**plans, "changed": changed})


def test_front_summary_and_points_by_hand():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from front_plot import front, summarize

    rows = [{"plan": "a", "seed": 0, "bytes": 1_000_000, "mAP50-95@640": 0.30},
            {"plan": "a", "seed": 1, "bytes": 1_000_000, "mAP50-95@640": 0.32},
            {"plan": "b", "seed": 0, "bytes": 2_000_000, "mAP50-95@640": 0.29}]
    s = summarize(rows, [640])
    assert [r["plan"] for r in s] == ["a", "b"] and s[0]["MB"] == 1.0
    assert s[0]["mean@640"] == pytest.approx(0.31) and s[0]["seeds@640"] == "0.3000 / 0.3200"
    # b is larger and less accurate than a: off the front; c and d trade size for accuracy; e ties a's size
    assert front([(1.0, 0.31), (2.0, 0.29), (0.5, 0.2), (3.0, 0.4), (1.0, 0.30)]) == [2, 0, 3]


def test_front_merge_adds_rows_and_refuses_disagreeing_ones():
    """Runs made one per core write separate JSONs; --merge joins their rows and training records, keeps a row
    read the same twice once, and refuses a plan and seed (or a trained stage) that two files disagree on."""
    front = front_module()
    row = lambda plan, seed, m: {"plan": plan, "seed": seed, "bytes": 1000, "mAP50-95@320": m, "mAP50-95@640": m}
    mine = {"rows": [row("a", 0, 0.3)], "training": {"s0": {"st1": {"wall_s": 5.0}}}}
    other = {"rows": [row("a", 0, 0.3), row("b", 0, 0.2), row("a", 1, 0.31)], "training": {"s0": {"st2": {"wall_s": 7.0}}}}
    merged = front.merge_results(mine, [other])
    assert [(r["plan"], r["seed"]) for r in merged["rows"]] == [("a", 0), ("b", 0), ("a", 1)]
    assert merged["training"] == {"s0": {"st1": {"wall_s": 5.0}, "st2": {"wall_s": 7.0}}}
    with pytest.raises(SystemExit, match="b seed 0 reads"):
        front.merge_results(merged, [{"rows": [row("b", 0, 0.25)], "training": {}}])
    with pytest.raises(SystemExit, match="different budgets"):
        front.merge_results({**merged, "budget": {"epochs_per_stage": 10}}, [{"rows": [], "budget": {"epochs_per_stage": 5}}])
    with pytest.raises(SystemExit, match="stage st1 of s0 was trained in two runs"):
        front.merge_results(merged, [{"rows": [], "training": {"s0": {"st1": {"wall_s": 6.0}}}}])


def test_front_keeps_each_trained_stage_record_before_the_next_stage(tmp_path, monkeypatch):
    """A run stopped in stage 2 has already saved stage 1's record; finished stages are not trained again."""
    import yolo_tq.train.stages as stages
    from yolo_tq.config import stage_outputs

    front = front_module()
    cfg = load_config(REPO / "configs" / "plans" / "ttq12_int4_stage3.yaml", {"checkpoint_dir": str(tmp_path)})
    saved, trained = [], []

    def fake_train(cfg_, numbers, resume=False):
        stage = cfg_.stages[numbers[0] - 1]
        if numbers == [2]:
            raise KeyboardInterrupt  # the run is stopped during stage 2
        out = stage_outputs(cfg_, stage)
        out.ternary.parent.mkdir(parents=True)
        out.ternary.write_bytes(b"x")
        trained.append(stage.name)

    monkeypatch.setattr(stages, "train_stages", fake_train)
    log = {}
    with pytest.raises(KeyboardInterrupt):
        front.train_plan_stages(cfg, log, lambda: saved.append(sorted(log)))
    assert trained == ["stage1"] and saved == [["stage1"]] and log["stage1"]["resumed"] is False
    monkeypatch.setattr(stages, "train_stages", lambda cfg_, numbers, resume=False: trained.append(numbers))
    used = front.train_plan_stages(cfg, {})
    assert trained == ["stage1", [2], [3]] and [u.split("/")[-2] for u in used] == ["stage1", "stage2", "stage3_int4"]


def test_front_labels_go_below_when_a_point_sits_close_to_the_right():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from front_plot import label_below

    # int2 / ttq12_int4_stage3 and the FP INT8 / OpenVINO pair of front.png; a point far away keeps its label above
    assert label_below([(1.722, 0.3128), (1.737, 0.3138), (2.734, 0.4498), (3.426, 0.4535), (1.2, 0.247)]) == \
        [True, False, True, False, False]


def test_front_merge_into_a_run_file_compares_budgets_without_the_seeds():
    """A run's JSON records the seeds it ran in its budget; merging another seed's run into it is the same budget."""
    front = front_module()
    budget = {"epochs_per_stage": 10, "batch": 16, "imgsz": 640}
    run_s0 = {"rows": [], "training": {}, "budget": {**budget, "seeds": [0]}}
    merged = front.merge_results(run_s0, [{"rows": [], "training": {}, "budget": {**budget, "seeds": [1]}}])
    assert merged["budget"] == budget  # a merged file holds several seeds: its budget names none
    with pytest.raises(SystemExit, match="different budgets"):
        front.merge_results(merged, [{"rows": [], "budget": {**budget, "batch": 8, "seeds": [1]}}])


def test_front_merge_refuses_an_out_that_is_one_of_its_inputs(tmp_path):
    import json

    run_json = tmp_path / "run_s0.json"
    run_json.write_text(json.dumps({"rows": [], "training": {}}))
    p = run(REPO / "benchmarks" / "front.py", "--merge", run_json, "--out", run_json)
    assert p.returncode != 0 and "is one of the --merge files" in p.stderr and "Traceback" not in p.stderr
    assert json.loads(run_json.read_text()) == {"rows": [], "training": {}}
