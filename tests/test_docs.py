"""tools/docs_check.py (`make docs-check`): a doc that names a profile key, file, module, make target,
link or bench option that does not exist, or a YAML block that does not validate, fails the check;
the real docs pass it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "tools" / "docs_check.py"

BENCH_OK = '''\
"""A bench with two options."""
import argparse

parser = argparse.ArgumentParser()
parser.add_argument("--rows", type=int)
parser.add_argument("--small-host", action="store_true")
parser.parse_args()
'''

# Right and wrong side by side: each wrong thing once, each right one beside it.
DOC = textwrap.dedent(
    """\
    # A page

    Set `train.lora_rank` (not `train.lora_rnk`), or `--set download.per_host_connections=8`; `model.safetensors`.

    ```bash
    sdflow run tiny-cpu --set download.per_host_conections=8 --set model.unet.block_out_channels=[32]
    python bench/ok.py --rows 10 --small-host     # fine
    python bench/ok.py --rows 10 --no-such-flag
    python bench/broken.py
    python bench/gone.py --rows 1
    ```

    ```yaml
    filter:
      metadata: {similarity: {min: 0.28}, pwatermark: {mean: 0.5}}
      classifiers: [{model: m, label: nsfw, max: 0.5}]
      near_dup: 4
    latents:
      buckets: {resolution: 1024, step: 64}
    download: {resolution: 4}
    ```

    Inline: `filter.semantic_dedup: {epsilon: 0.05, eps: 1}`. Code: `sdflow/store/stageio.py`,
    `sdflow/store/stagio.py`, `sdflow.store.stageio.stage_key`, `sdflow.store.stageio.stage_kee`,
    `sdflow.training.lop`. Run `make demo`, not `make demos`.
    See [the page](#a-page), not [this](#no-such-heading); ![grid](grid.png), ![gone](gone.png).
    """
)

EXPECTED = [
    "bad.md:3: profile key `train.lora_rnk` is not in the schema: train has no key 'lora_rnk'",
    "bad.md:6: profile key `download.per_host_conections` is not in the schema",
    "bad.md:14: profile key `filter.metadata.pwatermark.mean` is not in the schema: "
    "filter.metadata.pwatermark has no key 'mean'",
    "bad.md:14: profile key `filter.near_dup` is not in the schema",
    "bad.md:14: YAML block does not validate: `download.resolution`: Input should be greater than "
    "or equal to 8 (got 4)",
    "bad.md:23: profile key `filter.semantic_dedup.eps` is not in the schema",
    "bad.md:24: `sdflow/store/stagio.py` is not in the tree",
    "bad.md:24: `sdflow.store.stageio.stage_kee` is no module, nor a name defined in "
    "sdflow.store.stageio",
    "bad.md:25: `sdflow.training.lop` is no module, nor a name defined in sdflow",
    "bad.md:25: `make demos`: the Makefile has no such target",
    "bad.md:26: link to #no-such-heading: no such heading",
    "bad.md:26: link to gone.png: no such file",
    "bad.md:10: `bench/gone.py` is not in the tree",
    "bad.md:8: bench/ok.py has no option --no-such-flag (see --help)",
]


def run_check(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(CHECK), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


def fake_tree(root: Path) -> None:
    """A repository of its own: the paths, module, make target, image and bench scripts the doc names."""
    (root / "sdflow" / "store").mkdir(parents=True)
    (root / "sdflow" / "__init__.py").write_text("")
    (root / "sdflow" / "store" / "__init__.py").write_text("")
    (root / "sdflow" / "store" / "stageio.py").write_text("def stage_key():\n    pass\n")
    (root / "Makefile").write_text("demo:\n\techo demo\n")
    (root / "bench").mkdir()
    (root / "bench" / "ok.py").write_text(BENCH_OK)
    (root / "bench" / "broken.py").write_text("import sdflow_no_such_module  # noqa\n")
    (root / "grid.png").write_bytes(b"")


def test_a_doc_naming_what_does_not_exist_fails_with_each_problem(tmp_path):
    fake_tree(tmp_path)
    doc = tmp_path / "bad.md"
    doc.write_text(DOC)
    result = run_check("--root", str(tmp_path), str(doc))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for expected in EXPECTED:
        assert any(line.startswith(expected) for line in lines), (expected, result.stdout)
    # the broken bench: its own import error, from running it with --help
    broken = "bad.md:9: `bench/broken.py --help` exited 1:"
    assert broken in result.stdout and "No module named 'sdflow_no_such_module'" in result.stdout
    problems = [line for line in lines if line.startswith("bad.md:")]
    assert len(problems) == len(EXPECTED) + 1, result.stdout  # nothing right was reported
    assert f"{len(EXPECTED) + 1} problems" in lines[-1]
