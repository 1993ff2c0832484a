"""Continue training: which finished output a longer run starts from, and how its checkpoint is shared."""

from __future__ import annotations

from pathlib import Path

import torch

from sdflow.store.checkpoints import (
    best_step,
    list_checkpoints,
    load_latest,
    mark_best,
    save_checkpoint,
)
from sdflow.store.stageio import StageBuild, build_stage
from sdflow.training.continuation import CONTINUED, continue_from_predecessor, find_predecessor


def finished(workdir: Path, key: str, lineage: str, steps: int, keep_checkpoint: bool = True):
    """A finished train output of `steps` steps whose last checkpoint holds w = steps."""

    def work(build: StageBuild) -> dict:
        if keep_checkpoint:
            state = {"model": {"w": torch.full((2,), float(steps))}, "progress": {"step": steps}}
            save_checkpoint(build.path / "checkpoints", steps, state, keep=1)
        return build.finish(
            counts={"steps": steps},
            files={"checkpoints": "checkpoints"},
            info={"lineage": lineage},
        )

    return build_stage(workdir, "train", key, work)


def test_the_longest_finished_run_below_the_target_of_the_same_lineage_is_chosen(tmp_path):
    finished(tmp_path, "a10", "L", 10)
    finished(tmp_path, "a30", "L", 30)
    finished(tmp_path, "a90", "L", 90)  # longer than asked: cannot be shortened
    finished(tmp_path, "b50", "other", 50)  # another lineage (e.g. another lr)
    finished(tmp_path, "a40", "L", 40, keep_checkpoint=False)  # its checkpoint is gone
    root = tmp_path / "stages" / "train"
    found = find_predecessor(root, "L", 60)
    assert (found.key, found.steps) == ("a30", 30)
    assert find_predecessor(root, "L", 10) is None
    assert find_predecessor(root, "new", 60) is None


def test_seeding_hard_links_the_checkpoint_and_a_retry_remembers_where_it_started(tmp_path):
    finished(tmp_path, "a30", "L", 30)
    build = StageBuild(tmp_path, "train", "a60")
    build.path.mkdir(parents=True)
    checkpoints = build.path / "checkpoints"
    origin = continue_from_predecessor(build.path, checkpoints, "L", 60)
    assert origin == {"key": "a30", "step": 30}
    step, state = load_latest(checkpoints)
    assert step == 30 and torch.equal(state["model"]["w"], torch.full((2,), 30.0))
    source = tmp_path / "stages" / "train" / "a30" / "checkpoints" / "step-000030"
    for file in source.iterdir():  # shared, not copied
        assert (checkpoints / "step-000030" / file.name).stat().st_ino == file.stat().st_ino
    # the continued run checkpoints on; the finished run keeps its own checkpoint
    save_checkpoint(checkpoints, 40, {"model": {"w": torch.zeros(2)}}, keep=1)
    assert list_checkpoints(checkpoints) == [40]
    assert load_latest(source.parent)[0] == 30
    # a retry of the interrupted build resumes its own checkpoint and still reports its origin
    assert (build.path / CONTINUED).is_file()
    assert continue_from_predecessor(build.path, checkpoints, "L", 60) == origin
    assert list_checkpoints(checkpoints) == [40]


def test_a_build_with_checkpoints_of_its_own_is_not_seeded(tmp_path):
    finished(tmp_path, "a30", "L", 30)
    build = StageBuild(tmp_path, "train", "a60")
    checkpoints = build.path / "checkpoints"
    save_checkpoint(checkpoints, 4, {"model": {"w": torch.zeros(2)}}, keep=1)
    assert continue_from_predecessor(build.path, checkpoints, "L", 60) is None
    assert list_checkpoints(checkpoints) == [4]


def test_the_best_checkpoint_of_the_predecessor_comes_along_still_marked(tmp_path):
    def work(build: StageBuild) -> dict:
        for step in (10, 30):
            state = {"model": {"w": torch.full((2,), float(step))}, "progress": {"step": step}}
            save_checkpoint(build.path / "checkpoints", step, state, keep=1)
            if step == 10:
                mark_best(build.path / "checkpoints", 10)  # train.keep_best: step 10 was the best
        return build.finish(
            counts={"steps": 30}, files={"checkpoints": "checkpoints"}, info={"lineage": "L"}
        )

    build_stage(tmp_path, "train", "a30", work)
    build = StageBuild(tmp_path, "train", "a60")
    build.path.mkdir(parents=True)
    checkpoints = build.path / "checkpoints"
    continue_from_predecessor(build.path, checkpoints, "L", 60)
    assert list_checkpoints(checkpoints) == [10, 30] and best_step(checkpoints) == 10
    assert load_latest(checkpoints)[0] == 30  # training goes on from the last one
    save_checkpoint(checkpoints, 40, {"model": {"w": torch.zeros(2)}}, keep=1)
    assert list_checkpoints(checkpoints) == [10, 40]  # the best one is never pruned
