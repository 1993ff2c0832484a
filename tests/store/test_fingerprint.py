"""Code versions: every module a stage uses, transitively, and the libraries that compute its tensors."""

from __future__ import annotations

import sys
import textwrap

import pytest

from sdflow.store import fingerprint
from sdflow.store.fingerprint import code_closure, code_version


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package `fakepkg` on sys.path: stage -> a (imported inside a function) -> b; c unused."""
    root = tmp_path / "fakepkg"
    (root / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "stage.py": "import torch\n\ndef run():\n    from fakepkg.sub import a\n    return a.f()\n",
        "sub/__init__.py": "",
        "sub/a.py": "from ..b import helper\n\ndef f():\n    return helper()\n",
        "b.py": "from PIL import Image\n\ndef helper():\n    return 1\n",
        "c.py": "def unused():\n    return 2\n",
    }
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    fingerprint._code_version.cache_clear()
    fingerprint._path.cache_clear()
    sys.modules.pop("fakepkg", None)


def _version(name="fakepkg.stage") -> str:
    fingerprint._code_version.cache_clear()
    return code_version(name, follow=("fakepkg",))


def test_the_closure_follows_imports_inside_functions_and_relative_ones(package):
    sources, libraries = code_closure("fakepkg.stage", follow=("fakepkg",))
    assert sorted(sources) == [
        "fakepkg",
        "fakepkg.b",
        "fakepkg.stage",
        "fakepkg.sub",
        "fakepkg.sub.a",
    ]
    assert libraries == {"torch", "PIL"}


def test_editing_a_module_two_imports_away_changes_the_version(package):
    before = _version()
    (package / "c.py").write_text("def unused():\n    return 3\n")
    assert _version() == before  # not used by the stage
    (package / "b.py").write_text("from PIL import Image\n\ndef helper():\n    return 2\n")
    assert _version() != before


def test_a_minor_release_of_a_tensor_library_changes_the_version(package, monkeypatch):
    installed = {"torch": "2.5.1", "pillow": "11.0.0"}
    monkeypatch.setattr(fingerprint.metadata, "version", lambda dist: installed[dist])
    before = _version()
    installed["torch"] = "2.5.7"  # a patch release computes the same tensors
    assert _version() == before
    installed["torch"] = "2.6.0"
    assert _version() != before


def test_the_real_train_stage_covers_its_helpers_and_libraries():
    import tasks.train  # noqa: F401  (a stage computes its version once imported)

    sources, libraries = code_closure("tasks.train")
    # the modules whose edits used to reuse old training weights
    assert {
        "sdflow.training.schedules",
        "sdflow.training.latent_data",
        "sdflow.training.loop",
        "sdflow.models.components",
    } <= set(sources)
    assert "sdflow.ops.orchestration" not in sources  # Prefect wiring writes no tensors
    assert not [name for name in sources if name.startswith("sdflow.config")]  # schema is data
    assert {"torch", "diffusers", "transformers", "peft"} <= libraries


def test_a_module_of_the_config_package_is_data_too():
    """Importing a config module directly (not through `sdflow.config`) adds no source either."""
    sources, _ = code_closure("sdflow.profiles")  # imports from sdflow.config
    assert not [name for name in sources if name.startswith("sdflow.config")]
    sources, _ = code_closure("sdflow.config.train")
    assert sources == {}
