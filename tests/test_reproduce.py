"""The study runner's bookkeeping: which runs a study holds, which are done, and the tables made from rows."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from experiments import reproduce

OPTIMIZER = {"name": "sgd", "learning_rate": 0.01, "decay_boundaries": [], "decay_factor": 0.1, "momentum": 0.9,
             "nesterov": False, "weight_decay": 0.0, "loc_lr_multiplier": 1.0, "backbone_lr_multiplier": 1.0}


def row(task, model, transform, seed, error, steps=500, batch_size=64, source="idx", config="distorted_mnist"):
    arg = ",".join(p for p in ((model, transform) if task == "addition" else (task, model, transform)) if p)
    return dict(config=config, arg=arg, task=task, model=model, transform=transform, seed=seed, steps=steps,
                batch_size=batch_size, source=source, test_error=error, test_loss=0.5, optimizer=dict(OPTIMIZER),
                model_options={}, wall_time_s=100.0, resumed=False, workdir="nowhere", date="2026-11-29",
                machine="x86_64 2 CPUs", versions={"jax": "0.10.2"},
                command=f"python -m experiments.train --config=...:{arg}")


def test_studies_hold_the_papers_cells():
    table1 = reproduce.STUDIES["table1"](3)
    assert len(table1) == 32  # 4 tasks x the paper's eight models (FCN, CNN, ST-FCN and ST-CNN Aff/Proj/TPS)
    assert sum(c.seeds for c in table1) == 4 * (1 + 3 + 3 + 3 * 3)  # one seed for FCNs, all for CNNs
    assert {c.arg for c in table1 if c.task == "rts"} == {
        "rts,fcn", "rts,cnn", "rts,st_fcn,affine", "rts,st_fcn,projective", "rts,st_fcn,tps",
        "rts,st_cnn,affine", "rts,st_cnn,projective", "rts,st_cnn,tps"}
    assert [c.arg for c in reproduce.STUDIES["addition"](2)] == ["add_fcn", "add_cnn", "add_2st_fcn,tps"]
    for cell in table1 + reproduce.STUDIES["tc"](1) + reproduce.STUDIES["addition"](1):
        # Every cell is one the paper reports (its number lives in the model registry).
        assert reproduce.paper_error(cell.task, cell.model, cell.transform) is not None, cell
    assert reproduce.paper_error("rts", "st_cnn", "tps") == 0.5 and reproduce.paper_error("tc", "st_cnn", "tps") is None


def test_a_run_is_done_only_for_the_same_config_seed_budget_source_and_overrides():
    cell = reproduce.Cell("distorted_mnist", "rts", "st_cnn", "tps", 2)
    rows = [row("rts", "st_cnn", "tps", 0, 0.1)]
    assert reproduce._done(rows, cell, 0, 500, 64, "/data/mnist", {})
    assert not reproduce._done(rows, cell, 1, 500, 64, "/data/mnist", {})
    assert not reproduce._done(rows, cell, 0, 1000, 64, "/data/mnist", {})
    assert not reproduce._done(rows, cell, 0, 500, 256, "/data/mnist", {})
    assert not reproduce._done(rows, cell, 0, 500, 64, "tfds", {})
    assert not reproduce._done(rows, cell, 0, 500, 64, "/data/mnist", {"optimizer.decay_boundaries": "(250,)"})
    rows[0]["overrides"] = {"optimizer.decay_boundaries": "(250,)"}
    assert reproduce._done(rows, cell, 0, 500, 64, "/data/mnist", {"optimizer.decay_boundaries": "(250,)"})
    assert reproduce.run_name(cell, 1, 500, 64) == "rts_st_cnn_tps_s1_b64_n500"
    a = reproduce.run_name(cell, 1, 500, 64, {"optimizer.decay_boundaries": "(250,)"})
    b = reproduce.run_name(cell, 1, 500, 64, {"optimizer.decay_boundaries": "(100,)"})
    assert a.startswith("rts_st_cnn_tps_s1_b64_n500_o") and a != b
    # The linear probe of a CNN config is another run than the CNN's training.
    probe = reproduce.Cell("cub", "cub", "cub_cnn", "", 1, "efficientnet_lite0,cnn224", reproduce.PROBE)
    trained = reproduce.Cell("cub", "cub", "cub_cnn", "", 1, "efficientnet_lite0,cnn224")
    cub_rows = [{**row("cub", "cub_cnn", "", 0, 0.2, config="cub"), "arg": trained.arg}]
    assert reproduce._done(cub_rows, trained, 0, 500, 64, "x", {}) and not reproduce._done(cub_rows, probe, 0, 500,
                                                                                           64, "x", {})
    assert reproduce.run_name(probe, 0, 500, 64) != reproduce.run_name(trained, 0, 500, 64)


def test_overrides_scale_the_decay_into_the_budget_and_parse_key_values():
    assert reproduce.budget_overrides(1200, 0, {}) == {}
    assert reproduce.budget_overrides(1200, 1, {}) == {"optimizer.decay_boundaries": "(600,)"}
    assert reproduce.budget_overrides(1200, 2, {"a.b": "1"}) == {"a.b": "1", "optimizer.decay_boundaries": "(400,800,)"}
    assert reproduce.parse_overrides(["b=2", "a.x = 0.5"]) == {"a.x": "0.5", "b": "2"}
    with pytest.raises(ValueError, match="--set takes key=value"):
        reproduce.parse_overrides(["width"])


def test_svhn_and_cub_studies_hold_table_2_and_3_cells():
    svhn = reproduce.STUDIES["svhn"](2)
    assert [(c.arg, c.seeds) for c in svhn] == [(f"{m},{s},synthetic", 1 if m == "st_single" else 2)
                                                for s in (64, 128) for m in ("cnn", "st_single", "st_multi")]
    cub = reproduce.STUDIES["cub"](2)
    assert [(c.arg, c.module, c.seeds) for c in cub] == [
        ("efficientnet_lite0,cnn224", reproduce.PROBE, 1), ("efficientnet_lite0,cnn224", reproduce.TRAIN, 2),
        ("efficientnet_lite0,st2_448", reproduce.TRAIN, 2), ("efficientnet_lite0,st4_448", reproduce.TRAIN, 1)]
    for cell in svhn:
        size = cell.arg.split(",")[1]
        assert reproduce.paper_error(f"svhn{size}", cell.model, cell.transform) is not None, cell
    assert reproduce.paper_error("cub448", "cub_st2", "attention") == pytest.approx(16.1)
    # The fine-tuned cells start from the study's probe: its head.npz joins their overrides.
    import argparse

    args = argparse.Namespace(workroot="workdirs/cub30", steps=452, batch_size=8)
    study = {"data.classes": "1-30"}
    probe_dir = reproduce.run_name(cub[0], 0, 452, 8, study)
    assert reproduce.cell_overrides(cub[0], cub, args, study) == study
    assert reproduce.cell_overrides(cub[2], cub, args, study) == {
        "data.classes": "1-30", "model.options.head_init": f"workdirs/cub30/{probe_dir}/head.npz"}


def test_svhn_table_gives_both_framings_and_the_change_beside_table_2():
    def svhn_row(short, model, transform, size, error):
        r = row("svhn_synth", model, transform, 0, error, steps=1200, batch_size=32, config="svhn")
        return {**r, "arg": f"{short},{size},synthetic", "overrides": {"optimizer.name": "adam"}}
    rows = [svhn_row("cnn", "svhn_cnn", "", 64, 0.10), svhn_row("cnn", "svhn_cnn", "", 128, 0.30),
            svhn_row("st_multi", "svhn_st_multi", "affine", 64, 0.12)]
    text = reproduce.tables(rows)
    assert "### Synthetic house numbers: 1200 steps of batch 32; optimizer.name=adam; lr 0.01 constant\n" in text
    assert "| CNN | 10.00 / 4.0 | 30.00 / 5.6 | +20.00 / +1.6 |" in text
    assert "| ST-CNN Multi Aff | 12.00 / 3.6 | not run / 3.9 | – / +0.3 |" in text
    assert "Distorted MNIST" not in text


def test_cub_table_gives_accuracy_beside_table_3_the_probe_the_schedule_and_the_crops():
    def cub_row(arg, model, transform, error, **extra):
        r = row("cub", model, transform, 0, error, steps=452, batch_size=8, config="cub")
        options = {"backbone": "efficientnet_lite0", "batch_norm": "frozen"}
        optimizer = {**OPTIMIZER, "decay_boundaries": [226, 10_000], "backbone_lr_multiplier": 0.01,
                     "loc_lr_multiplier": 1e-4}
        return {**r, "arg": arg, "overrides": {"data.classes": "1-30", "optimizer.decay_boundaries": "(226,)"},
                "optimizer": optimizer, "model_options": options, **extra}
    rows = [cub_row("efficientnet_lite0,cnn224", "cub_cnn", "", 0.19, module=reproduce.PROBE),
            cub_row("efficientnet_lite0,cnn224", "cub_cnn", "", 0.25),
            cub_row("efficientnet_lite0,st2_448", "cub_st2", "attention", 0.2,
                    crops={"mean_abs_shift": [0.05, 0.125]})]
    text = reproduce.tables(rows)
    heading = ("### CUB-200-2011: 452 steps of batch 8; data.classes=1-30; lr 0.01 x0.1 at step 226 (backbone x0.01, "
               "localisation x0.0001, BatchNorm frozen)")
    assert heading in text and text.count("### CUB") == 1  # the probe is the anchor row, not its own budget
    assert "| linear probe (frozen backbone, anchor) | efficientnet_lite0 | 224 px | 81.00 | - | – |" in text
    assert "| CNN | efficientnet_lite0 | 224 px | 75.00 | 82.3 | – |" in text
    assert "| 2xST-CNN | efficientnet_lite0 | 448 px | 80.00 | 83.9 | 0.050 / 0.125 |" in text
    assert "| efficientnet_lite0,cnn224 | 0 | 81.00 | 0.5000 | – (no training) |" in reproduce.runs_page(rows)


def test_schedule_text_states_the_drops_within_the_run():
    r = row("rts", "cnn", "", 0, 0.1, steps=3000)
    assert reproduce.schedule_text(r) == "lr 0.01 constant"
    r["optimizer"] = {**OPTIMIZER, "decay_boundaries": [1500, 50_000]}
    assert reproduce.schedule_text(r) == "lr 0.01 x0.1 at step 1500"
    assert reproduce.schedule_text({**r, "optimizer": None}) == "schedule not recorded"
    r["optimizer"]["warmup_steps"] = 500
    assert reproduce.schedule_text(r) == "lr 0.01 after a linear warm-up of 500 steps x0.1 at step 1500"
    r["optimizer"]["decay_boundaries"] = []
    assert reproduce.schedule_text(r) == "lr 0.01 after a linear warm-up of 500 steps"


def test_a_runs_logged_learning_rates_are_what_its_row_says(tmp_path, monkeypatch, synthetic_mnist):
    """A real (tiny) study run: every logged rate equals the schedule of the row, from the run's own config."""
    import argparse

    import optax

    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "runs.jsonl")
    cell = reproduce.Cell("distorted_mnist", "rts", "st_fcn", "affine", 1)
    args = argparse.Namespace(workroot=str(tmp_path / "runs"), source=synthetic_mnist, steps=6, batch_size=8,
                              evals=1)
    overrides = reproduce.budget_overrides(6, 2, {"optimizer.loc_lr_multiplier": "0.5",
                                                  "data.test_size": "16", "eval_batch_size": "16"})
    r = reproduce.run_cell(cell, 0, args, overrides)
    assert r["optimizer"]["decay_boundaries"] == [2, 4] and reproduce.schedule_text(r) == (
        "lr 0.01 x0.1 at step 2, 4 (localisation x0.5)")
    schedule = optax.piecewise_constant_schedule(r["optimizer"]["learning_rate"], {
        b: r["optimizer"]["decay_factor"] for b in r["optimizer"]["decay_boundaries"]})
    logged = [m for m in reproduce._metrics(r["workdir"]) if "learning_rate" in m]
    assert [m["step"] for m in logged] == list(range(1, 7))  # one record per step (log_every 1)
    for m in logged:  # the record of step s is the update that step s - 1 -> s made
        assert m["learning_rate"] == pytest.approx(float(schedule(m["step"] - 1)), rel=1e-6)
        assert m["learning_rate_loc"] == pytest.approx(0.5 * float(schedule(m["step"] - 1)), rel=1e-6)


def test_picture_names_follow_the_config_argument():
    assert reproduce.picture_name(row("rts", "st_cnn", "tps", 0, 0.1)) == "results_rts_st_cnn_tps.png"
    add = row("addition", "add_2st_fcn", "tps", 0, 0.5, config="mnist_addition")
    assert reproduce.picture_name(add) == "results_addition_add_2st_fcn_tps.png"
    svhn = {**row("svhn_synth", "svhn_st_single", "affine", 0, 0.1), "arg": "st_single,128,synthetic"}
    assert reproduce.picture_name(svhn) == "results_svhn_synth_st_single_128_synthetic.png"


def test_tables_show_mean_std_over_seeds_beside_the_paper():
    rows = [row("rts", "cnn", "", 0, 0.10), row("rts", "cnn", "", 1, 0.20), row("rts", "st_cnn", "tps", 0, 0.05),
            row("r", "fcn", "", 0, 0.3), row("addition", "add_2st_fcn", "tps", 0, 0.5, config="mnist_addition")]
    text = reproduce.tables(rows)
    assert "### Budget: 500 steps of batch 64" in text
    assert "| model | R | RTS |" in text
    assert "| CNN | not run / 1.2 | 15.00 ± 7.07 (n=2) / 0.8 |" in text
    assert "| ST-CNN TPS | not run / 0.7 | 5.00 / 0.5 |" in text
    assert "| FCN | 30.00 / 2.1 | not run / 5.2 |" in text
    assert "**MNIST addition**" in text and "| 2xST-FCN TPS | 50.00 / 5.8 |" in text
    assert "5 runs; wall time per run 100-100 s" in text


def test_pages_are_regenerated_results_between_the_markers_runs_whole(tmp_path, monkeypatch):
    page, runs = tmp_path / "results.md", tmp_path / "runs.md"
    page.write_text(f"# Results\nintro\n{reproduce.BEGIN}\nold table\n{reproduce.END}\noutro\n")
    runs.write_text("old runs page\n")
    monkeypatch.setattr(reproduce, "RESULTS_PAGE", page)
    monkeypatch.setattr(reproduce, "RUNS_PAGE", runs)
    monkeypatch.setattr(reproduce, "IMAGES", tmp_path)
    rows = [row("rts", "cnn", "", 0, 0.1)]
    reproduce.write_page(rows)
    text = page.read_text()
    assert text.startswith("# Results\nintro\n") and text.endswith(f"{reproduce.END}\noutro\n")
    assert "old table" not in text and "| CNN | 10.00 / 0.8 |" in text
    assert runs.read_text() == reproduce.runs_page(rows) and "old runs page" not in runs.read_text()
    first = page.read_text(), runs.read_text()
    reproduce.write_page(rows)  # regenerating from the same rows changes nothing
    assert (page.read_text(), runs.read_text()) == first


def test_unknown_study_is_an_error(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["table2"])
    assert "unknown study 'table2'; choose from table1, tc, addition" in capsys.readouterr().err


def test_models_filter_restricts_the_plan_and_rejects_unknown_names(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "runs.jsonl")
    reproduce.main(["addition", "--models", "add_fcn,add_2st_fcn", "--dry_run", "--seeds", "1"])
    assert capsys.readouterr().out.splitlines() == [
        "todo  addition  mnist_addition:add_fcn seed 0", "todo  addition  mnist_addition:add_2st_fcn,tps seed 0"]
    reproduce.main(["cub", "--models", "cub_st2", "--dry_run", "--seeds", "1"])  # brings the probe it starts from
    assert capsys.readouterr().out.splitlines() == [
        "todo  cub       cub:efficientnet_lite0,cnn224 (linear probe) seed 0",
        "todo  cub       cub:efficientnet_lite0,st2_448 seed 0"]
    with pytest.raises(SystemExit):
        reproduce.main(["addition", "--models", "st_cnn"])
    expected = "unknown model(s) st_cnn for these studies; choose from add_2st_fcn, add_cnn, add_fcn"
    assert expected in capsys.readouterr().err


def test_rows_round_trip_through_the_results_file(tmp_path):
    path = tmp_path / "runs.jsonl"
    rows = [row("r", "cnn", "", 0, 0.1), row("r", "cnn", "", 1, 0.2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert reproduce.read_rows(path) == rows
    assert reproduce.read_rows(tmp_path / "absent.jsonl") == []


def test_runs_with_other_overrides_are_a_separate_budget():
    plain = row("addition", "add_fcn", "", 0, 0.9, steps=3000, config="mnist_addition")
    adam = {**row("addition", "add_fcn", "", 0, 0.5, steps=3000, config="mnist_addition"),
            "overrides": {"optimizer.name": "adam"}}
    text = reproduce.tables([plain, adam])
    assert "### Budget: 3000 steps of batch 64 (3.2 epochs of MNIST); lr 0.01 constant\n" in text
    assert "### Budget: 3000 steps of batch 64 (3.2 epochs of MNIST); optimizer.name=adam; lr 0.01 constant\n" in text
    assert "| FCN | 90.00 / 47.7 |" in text and "| FCN | 50.00 / 47.7 |" in text


def study_rows() -> list[dict]:
    """Rows of every family: two MNIST budgets, SVHN, CUB (a probe and a fine-tune) and co-localisation."""
    svhn = {**row("svhn_synth", "svhn_cnn", "", 0, 0.3, steps=1200, batch_size=32, config="svhn"),
            "arg": "cnn,64,synthetic"}
    cub_options = {"model_options": {"backbone": "efficientnet_lite0"}, "overrides": {"data.classes": "1-30"}}
    probe = {**row("cub", "cub_cnn", "", 0, 0.2, steps=452, batch_size=8, config="cub"),
             "arg": "efficientnet_lite0,cnn224", "module": reproduce.PROBE, **cub_options}
    cub = {**probe, "module": reproduce.TRAIN, "test_error": 0.25}
    coloc = {**row("coloc_set", "coloc_st", "attention", 0, 0.0, steps=300, batch_size=100, config="colocalisation"),
             "arg": "t,8", "localised": 0.0, "mean_iou": 0.1}
    del coloc["test_error"], coloc["test_loss"]
    return [row("rts", "cnn", "", 0, 0.1), row("rts", "cnn", "", 1, 0.2), row("r", "fcn", "", 0, 0.3, steps=3000),
            row("addition", "add_fcn", "", 0, 0.9, config="mnist_addition"), svhn, probe, cub, coloc]


def test_runs_page_holds_every_run_with_its_command_under_the_results_headings():
    rows = study_rows()
    page = reproduce.runs_page(rows)
    assert page.startswith(f"# {reproduce.RUNS_TITLE}\n\n{reproduce.RUNS_INTRO}\n") and page.endswith("|\n")
    assert "--table_only" in reproduce.RUNS_INTRO  # the page says how it is made
    for r in rows:
        assert f"`{r['command']}` |" in page, r["arg"]
    assert page.count("python -m experiments.train --config=") == len(rows)  # one line per run
    block = reproduce.tables(rows)
    headings = [line[4:] for line in block.splitlines() if line.startswith("### ")]
    assert [line[3:] for line in page.splitlines() if line.startswith("## ")] == headings
    assert len(headings) == 5 and [h.split(":")[0] for h in headings] == [
        "Budget", "Budget", "Synthetic house numbers", "CUB-200-2011", "Co-localisation"]
    assert "| run | seed | test error % | test loss | schedule (the run's config) | wall s | command |" in page
    assert "| rts cnn | 1 | 20.00 | 0.5000 | lr 0.01 constant | 100 | `python -m experiments.train" in page


def test_results_block_holds_no_command_and_links_each_budget_to_its_runs():
    rows = study_rows()
    block, page = reproduce.tables(rows), reproduce.runs_page(rows)
    assert "python -m experiments.train --config=" not in block and "<details>" not in block
    anchors = set(reproduce.github_anchors([line.lstrip("#").strip() for line in page.splitlines()
                                            if line.startswith("#")]))
    links = re.findall(r"\]\(runs\.md#([^)]+)\)", block)
    assert len(links) == block.count("### ") == 5 and set(links) <= anchors
    assert "[runs.md](runs.md#budget-500-steps-of-batch-64-05-epochs-of-mnist-lr-001-constant)" in block
    assert "3 runs; wall time per run 100-100 s (median 100 s), total 0.1 h on x86_64 2 CPUs, jax 0.10.2" in block
    assert reproduce.tables(rows) == block and reproduce.runs_page(rows) == page  # regenerating gives the same


def test_github_anchors_follow_githubs_rule_with_suffixes_for_repeats():
    # Headings of docs/results.md and docs/coloc.md whose anchors the docs link to.
    assert reproduce.github_anchor("At 3,000 steps (the converging budget)") == "at-3000-steps-the-converging-budget"
    assert reproduce.github_anchor("SVHN (Table 2) on synthetic house numbers") == (
        "svhn-table-2-on-synthetic-house-numbers")
    assert reproduce.github_anchor("Co-localisation: 300 steps of batch 100") == (
        "co-localisation-300-steps-of-batch-100")
    assert reproduce.github_anchor("x: model.options.width_multiplier=0.125 – ± `a`") == (
        "x-modeloptionswidth_multiplier0125---a")
    assert reproduce.github_anchors(["A b", "a B", "a-b-1", "A b"]) == ["a-b", "a-b-1", "a-b-1-1", "a-b-2"]


def test_coloc_table_averages_seeds_per_class_and_says_where_the_crops_ended(tmp_path, monkeypatch):
    options = {"encoder": "workdirs/coloc_encoder", "localisation": {"fc": [96, 96]}}

    def coloc_row(arg, seed, localised, final=None, model_options=options):
        r = dict(row("coloc_set", "coloc_st", "attention", seed, 0.0, steps=300, batch_size=100,
                      config="colocalisation"), arg=arg, localised=localised, mean_iou=0.25,
                 model_options=model_options)
        del r["test_error"], r["test_loss"]
        return dict(r, final_eval=final) if final else r

    end = {"scale": 0.5, "centre_error_px": 2.0, "centred": 1.0}
    rows = [coloc_row("t,3", 0, 0.5, end), coloc_row("t,3", 1, 1.0, dict(end, scale=0.3)), coloc_row("tc,0", 0, 0.0)]
    text = reproduce.tables(rows)
    assert "### Co-localisation: 300 steps of batch 100; encoder a finished run, localisation FC 96/96\n" in text
    assert "| T | seeds run | 0 | 0 | 0 | 2 |" in text
    lines = {line.rsplit("|", 12)[0]: line for line in text.splitlines() if line.startswith("| T")}
    assert "| T | localised % | – | – | – | 75 |" in text and lines["| T | localised % "].endswith("| – | 100 |")
    assert lines["| T | mean IoU "].endswith("| – |  |")  # the paper's number only on the localised row
    assert "| T | crop half-side s (digit frame: 0.33) | – | – | – | 0.40 |" in text
    assert "| T | `centred` % (diagnostic: a digit-sized box at the crop's centre) | – | – | – | 100 |" in text
    assert "| TC | localised % | 0 | –" in text and "| TC | mean IoU | 0.250 |" in text
    assert "| TC | crop half-side s (digit frame: 0.33) | – |" in text  # an older row without its final evaluation
    runs = reproduce.runs_page(rows)  # every run: its final crop and what its row does not record ("–")
    assert "| t,3 | 1 | 100 | 0.250 | 0.30 | 2.00 | – | 100 | `python -m experiments.train --config=" in runs
    assert "| tc,0 | 0 | 0 | 0.250 | – | – | – | 100 |" in runs
    # The final evaluation is read from the run's metrics (the last line with test metrics).
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "test_scale": 0.9}\n{"step": 2, "loss": 1}\n'
                                       '{"step": 2, "test_scale": 0.7, "test_centred": 0.5}\n')
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    assert reproduce.final_eval(run.relative_to(tmp_path)) == {"scale": 0.7, "centred": 0.5}
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n')
    with pytest.raises(RuntimeError, match="no test evaluation"):
        reproduce.final_eval(run)
    # Runs of another model setting (an encoder trained inside the model, other FC widths) get their own table.
    older = coloc_row("t,3", 0, 0.0, model_options={"encoder": "", "encoder_task": "r", "encoder_steps": 600,
                                                    "localisation": {"fc": [128, 128]}})
    headings = [line for line in reproduce.tables(rows + [older]).splitlines() if line.startswith("### ")]
    assert headings == ["### Co-localisation: 300 steps of batch 100; encoder a finished run, localisation FC 96/96",
                        "### Co-localisation: 300 steps of batch 100; encoder trained by the model (R, 600 steps), "
                        "localisation FC 128/128"]


def test_coloc_study_trains_its_encoder_first_and_passes_its_workdir_to_every_cell(tmp_path, monkeypatch, capsys):
    """The encoder (``configs/colocalisation.py:encoder``) runs once, before the first cell, when its workdir holds
    no finished run; every cell gets ``model.options.encoder=<that workdir>``; a second start trains nothing."""
    import subprocess

    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "runs.jsonl")
    monkeypatch.setattr(reproduce, "write_page", lambda rows: None)
    monkeypatch.chdir(tmp_path)
    encoder = tmp_path / "runs" / "coloc_encoder"
    events = []

    def fake_train(command, **kwargs):  # the encoder's run: config.json and its final checkpoint
        events.append(("encoder", command[3:]))
        (encoder / "checkpoints" / "7").mkdir(parents=True)
        (encoder / "config.json").write_text(json.dumps({"total_steps": 7}))
        (encoder / "metrics.jsonl").write_text('{"step": 7, "test_error": 0.011, "test_loss": 0.04}\n')
        return subprocess.CompletedProcess(command, 0, stdout="test_error=0.011 test_loss=0.04\n")

    def fake_cell(cell, seed, args, overrides):
        events.append(("cell", cell.arg, overrides))
        return dict(config=cell.config, arg=cell.arg, seed=seed, steps=args.steps, batch_size=args.batch_size,
                    source="idx", overrides=overrides, localised=0.5, mean_iou=0.4, wall_time_s=1.0)

    monkeypatch.setattr(reproduce.subprocess, "run", fake_train)
    monkeypatch.setattr(reproduce, "run_cell", fake_cell)
    study = ["coloc", "--source", "mnist", "--steps", "300", "--batch_size", "100", "--seeds", "1",
             "--workroot", "runs"]
    reproduce.main([*study, "--dry_run"])
    assert capsys.readouterr().out.splitlines()[:2] == [
        "todo  prerequisite colocalisation:encoder -> runs/coloc_encoder", "todo  coloc     colocalisation:t,0 seed 0"]
    reproduce.main(study)
    assert events[0] == ("encoder", ["--config=configs/colocalisation.py:encoder", "--workdir=runs/coloc_encoder",
                                     "--config.data.source=mnist", "--config.data.cache_dir=runs/data_cache"])
    cells = events[1:]
    assert len(cells) == 20 and all(e[0] == "cell" for e in cells)  # 10 classes x T, TC; the encoder once
    assert all(e[2] == {"model.options.encoder": "runs/coloc_encoder"} for e in cells)
    events.clear()
    reproduce.main(study)  # everything done: nothing runs
    assert events == []
    reproduce.main([*study, "--dry_run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-21] == "done  prerequisite colocalisation:encoder -> runs/coloc_encoder"
    assert all(line.startswith("done  coloc") for line in lines[-20:])
    # A row of such a cell records the encoder's final evaluation; the table's footer states its error.
    r = {**row("coloc_set", "coloc_st", "attention", 0, 0.0, steps=300, batch_size=100, config="colocalisation"),
         "arg": "t,8", "localised": 1.0, "mean_iou": 0.7,
         "prerequisite": {"workdir": "runs/coloc_encoder", "error": 0.011, "loss": 0.04}}
    assert "Encoder runs/coloc_encoder: test error 1.10 %." in reproduce.tables([r])


def test_rows_record_the_code_commit(tmp_path, monkeypatch):
    assert re.fullmatch(r"[0-9a-f]{12}(\+changes)?|unknown \(not a git checkout\)", reproduce.code_commit())
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)  # not a git checkout
    assert reproduce.code_commit() == "unknown (not a git checkout)"


# The paper's Table 1 (Sect. 4.1; test error %, columns R, RTS, P, E), transcribed from the paper for this test.
PAPER_TABLE_1 = """
FCN          2.1 5.2 3.1 3.2
CNN          1.2 0.8 1.5 1.4
ST-FCN Aff   1.2 0.8 1.5 2.7
ST-FCN Proj  1.3 0.9 1.4 2.6
ST-FCN TPS   1.1 0.8 1.4 2.4
ST-CNN Aff   0.7 0.5 0.8 1.2
ST-CNN Proj  0.8 0.6 0.8 1.3
ST-CNN TPS   0.7 0.5 0.8 1.1
"""


def test_paper_numbers_are_the_papers_table_1():
    """Every Table 1 number the model registry holds (what the study reports beside its own) equals the paper's."""
    names = {"FCN": ("fcn", ""), "CNN": ("cnn", "")}
    names.update({f"{family} {short}": (family.lower().replace("-", "_"), t) for family in ("ST-FCN", "ST-CNN")
                  for short, t in (("Aff", "affine"), ("Proj", "projective"), ("TPS", "tps"))})
    checked = 0
    for line in PAPER_TABLE_1.strip().splitlines():
        *words, r, rts, p, e = line.split()
        model, transform = names[" ".join(words)]
        for task, value in zip(("r", "rts", "p", "e"), (r, rts, p, e)):
            assert reproduce.paper_error(task, model, transform) == float(value), (words, task)
            checked += 1
    assert checked == 32


def test_figures_of_runs_without_a_workdir_here_are_kept(tmp_path, monkeypatch, capsys):
    """A study's figures are redrawn only from complete workdirs: one missing run keeps the committed figure."""
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    monkeypatch.setattr(reproduce, "IMAGES", tmp_path / "images")
    (tmp_path / "images").mkdir()
    for name in ("results_curves_rts.png", "results_rts_st_cnn_tps.png"):
        (tmp_path / "images" / name).write_bytes(b"committed")
    here = {**row("rts", "st_cnn", "tps", 1, 0.1), "workdir": "here"}
    (tmp_path / "here" / "images").mkdir(parents=True)
    (tmp_path / "here" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "test_error": 0.1}\n')
    Image.new("RGB", (4, 4)).save(tmp_path / "here" / "images" / "transformer_step2.png")
    gone = row("rts", "st_cnn", "tps", 0, 0.2)  # seed 0: the run the picture shows, its workdir elsewhere
    reproduce._curves([here, gone])
    reproduce._pictures([here, gone])
    for name in ("results_curves_rts.png", "results_rts_st_cnn_tps.png"):
        assert (tmp_path / "images" / name).read_bytes() == b"committed"
    out = capsys.readouterr().out
    assert "kept results_curves_rts.png: 1 of its 2 runs" in out and "kept 1 transformer pictures" in out
    reproduce._curves([here])
    reproduce._pictures([here])
    for name in ("results_curves_rts.png", "results_rts_st_cnn_tps.png"):
        assert (tmp_path / "images" / name).read_bytes().startswith(b"\x89PNG")


def test_the_picture_of_a_budget_run_twice_is_the_newest_runs(tmp_path, monkeypatch):
    """Two runs of the same budget and seed (e.g. before and after a recipe change): the newer row's picture."""
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    monkeypatch.setattr(reproduce, "IMAGES", tmp_path / "images")
    (tmp_path / "images").mkdir()
    runs = []
    for name, colour in (("old", (255, 0, 0)), ("new", (0, 0, 255))):
        (tmp_path / name / "images").mkdir(parents=True)
        Image.new("RGB", (4, 4), colour).save(tmp_path / name / "images" / "transformer_step2.png")
        runs.append({**row("rts", "st_cnn", "tps", 0, 0.1), "workdir": name})
    reproduce._pictures(runs)
    with Image.open(tmp_path / "images" / "results_rts_st_cnn_tps.png") as im:
        assert im.getpixel((0, 0)) == (0, 0, 255)


def test_plot_curves_reads_runs_and_draws_both_panels(tmp_path):
    """`experiments.plot_curves`: the moving average by hand, the curves read from metrics.jsonl (errors in
    %), a picture from two runs; a workdir without metrics is one line."""
    import subprocess
    import sys

    from experiments import plot_curves

    ROOT = reproduce.ROOT
    np.testing.assert_allclose(plot_curves.smoothed([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])
    for name, shift in (("a", 0.0), ("b", 0.5)):
        rows = [{"step": s, "loss": 6.0 - s / 100 - shift, "error": 0.9 - s / 1000} for s in range(10, 210, 10)]
        rows.insert(10, {"step": 100, "test_error": 0.8 - shift / 10, "test_loss": 5.0})
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = plot_curves.curves(plot_curves.read_metrics(tmp_path / "b"))
    assert c["test_error"] == ([100], [pytest.approx(75.0)]) and c["error"][1][0] == pytest.approx(89.0)
    tool = [sys.executable, "-m", "experiments.plot_curves", f"--out={tmp_path / 'curves.png'}"]
    out = subprocess.run([*tool, f"--run=A={tmp_path / 'a'}", f"--run=B={tmp_path / 'b'}", "--floor=98",
                          "--floor_label=marginal"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    missing = subprocess.run([*tool, f"--run=A={tmp_path / 'nowhere'}"], cwd=ROOT, capture_output=True, text=True,
                             timeout=240)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and "no metrics.jsonl" in missing.stderr
