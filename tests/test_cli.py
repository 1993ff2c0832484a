"""The `sdflow` command: user errors end in one paragraph and exit code 2, never a traceback."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from sdflow.cli import main


def _sdflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdflow.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_profiles_lists_each_with_a_description(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert "tiny-cpu" in out and "tiny-test" in out
    assert "From scratch on the demo shapes dataset" in out


def test_bad_config_is_one_paragraph_and_exit_2():
    result = _sdflow("check", "tiny-test", "--set", "train.lr=-3", "--set", "train.nope=1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "train.lr = -3" in result.stderr and "train.nope: unknown key" in result.stderr


def test_missing_source_path_is_a_user_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = main(["run", "tiny-test", "--workdir", str(tmp_path), "--set", f"source.path={missing}"])
    assert code == 2
    assert f"source.path '{missing}' does not exist" in capsys.readouterr().err


def test_workdir_that_is_a_file_is_a_user_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", "tiny-test", "--workdir", str(blocker / "sub")]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_unknown_stage_in_only_is_rejected():
    result = _sdflow("run", "tiny-test", "--only", "download,trian")
    assert result.returncode == 2
    assert "unknown stage(s) trian" in result.stderr


def test_check_prints_resolved_config_and_environment(demo_folder, capsys):
    assert main(["check", "tiny-test", "--set", f"source.path={demo_folder}"]) == 0
    out = capsys.readouterr().out
    assert '"resolution": 32' in out
    assert "torch " in out and "device:" in out


HEAVY = ("torch", "diffusers", "transformers", "prefect")


def _heavy_modules_after(code: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """The heavy libraries a fresh interpreter has loaded after running `code` (no GPU visible)."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a GPU driver would rightly import torch
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])


def test_profiles_and_check_import_no_heavy_library(demo_folder):
    listing = "from sdflow.cli import main\nassert main(['profiles']) == 0"
    assert _heavy_modules_after(listing, (*HEAVY, "pydantic")) == []  # not even the schema
    check = f"from sdflow.cli import main\nassert main(['check', 'tiny-test', '--set', 'source.path={demo_folder}']) == 0"
    assert _heavy_modules_after(check) == []


def test_pipeline_module_defers_the_model_libraries():
    """The flow starts its first stage before torch / diffusers / transformers are imported."""
    loaded = _heavy_modules_after("import flows.pipeline")
    assert loaded == ["prefect"]


def test_data_stages_without_a_model_import_no_model_library():
    """download, filter (no CLIP filter) and caption (`keep`): their modules, keys and checks need
    no torch, diffusers or transformers (tens of seconds of a run under load)."""
    code = (
        "from sdflow.config import RunConfig\n"
        "import tasks.download, tasks.filter, tasks.caption\n"
        "config = RunConfig.model_validate({'source': {'kind': 'urls', 'path': 'u.csv'}, 'caption': {'backend': 'keep'}})\n"
        "tasks.filter.filter_settings(config), tasks.caption.caption_settings(config)\n"
        "tasks.filter.sample_checks(config.filter, caption_rules=True)\n"
        "tasks.caption.make_captioner(config.caption, None)\n"
    )
    assert _heavy_modules_after(code, HEAVY[:3]) == []


def _summary(workdir, run, profile, status, started, model=True) -> str:
    """A run's summary.json as the pipeline writes it, with an exported pipeline directory."""
    import json

    model_dir = workdir / "stages" / "train" / run / "pipeline"
    if model:
        model_dir.mkdir(parents=True)
        (model_dir / "model_index.json").write_text("{}")
    summary = {
        "profile": profile,
        "status": status,
        "started_at": started,
        "model_dir": str(model_dir),
    }
    (workdir / "runs" / run).mkdir(parents=True)
    (workdir / "runs" / run / "summary.json").write_text(json.dumps(summary))
    return str(model_dir)


def test_finetune_demo_without_a_first_demo_says_to_run_it(tmp_path, capsys):
    _summary(tmp_path, "r1", "tiny-test", "completed", "2026-01-01T00:00:00")
    assert main(["demo", "--finetune", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No completed `sdflow demo` run" in err and "Run `sdflow demo --workdir" in err
    assert not (tmp_path / "demo-finetune-data").exists()  # nothing built before the check


def test_finetune_demo_starts_from_the_newest_completed_demo_model(tmp_path):
    from sdflow.cli import demo_model

    _summary(tmp_path, "a", "tiny-cpu", "completed", "2026-01-01T10:00:00")
    newest = _summary(tmp_path, "b", "tiny-cpu", "completed", "2026-01-02T10:00:00")
    _summary(tmp_path, "c", "tiny-cpu", "failed", "2026-01-03T10:00:00")
    _summary(tmp_path, "d", "tiny-cpu-finetune", "completed", "2026-01-04T10:00:00")
    _summary(tmp_path, "e", "tiny-cpu", "completed", "2026-01-05T10:00:00", model=False)
    assert demo_model(tmp_path) == newest


def test_finetune_demo_checks_its_overrides_before_drawing_images(tmp_path, capsys):
    _summary(tmp_path, "a", "tiny-cpu", "completed", "2026-01-01T10:00:00")
    args = ["demo", "--finetune", "--workdir", str(tmp_path), "--set", "train.max_steps=0"]
    assert main(args) == 2
    assert "train.max_steps = 0" in capsys.readouterr().err
    assert not (tmp_path / "demo-finetune-data").exists()
