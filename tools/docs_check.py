"""Check that the docs name only things that exist: profile keys, files, modules, bench commands.

    python tools/docs_check.py [--root DIR] [DOC.md ...]   # default: README.md and docs/*.md

Reads the code spans and fenced blocks of each document and reports, with file and line:
- a profile key (`train.lora_rank`, `--set download.per_host_connections=8`, the keys of a YAML
  block or of an inline `filter.metadata: {...}`) that the config schema does not have: the pydantic
  models under `sdflow.config.RunConfig` are walked field by field (dicts take any key, lists and
  unions are looked through); a YAML block's section whose values do not validate as that section;
- a repository path (`sdflow/store/stageio.py`, `tests/flows/test_chaos.py`, `profiles/x.yaml`) or
  module (`sdflow.training.loop`, `sdflow.store.handoff.ThreadHandoff`) that is not in the tree;
- a `make` target that the Makefile lacks; a local link to an image that is not there, or to a
  heading that the page lacks (a missing .md page is let pass: another change may add it);
- a `bench/` script that does not run with `--help`, or whose help lacks an option the docs give it.

The `--help` runs are what costs (most benches import torch first): tools/bench_help.py imports what
they import once and forks a child per script. Exit status 1 when anything is reported.

It lives in tools/ because it checks the repository, not the library: sdflow/ is what users install,
tests/ mirrors sdflow/ (tests/test_docs.py runs this script), bench/ measures.
"""

from __future__ import annotations

import ast
import re
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import bench_help  # tools/, beside this script
import yaml

REPO = Path(__file__).resolve().parent.parent  # whose sdflow.config is the schema
ROOT = REPO  # where paths, modules, make targets and bench scripts are looked up (--root)
SECTIONS = ("source", "download", "filter", "caption", "model", "autoencoder", "latents", "train")
SECTIONS += ("eval", "runner")
KEY = re.compile(rf"(?<![\w./$-])(?:{'|'.join(SECTIONS)})(?:\.[A-Za-z_]\w*)+(?![\w/-]|\.\w)")
PATH = re.compile(
    r"(?<![\w./-])(?:sdflow|tests|bench|flows|tasks|profiles|deployments|tools)/[\w./*-]*"
)
MODULE = re.compile(r"(?<![\w./-])(?:sdflow|tasks|flows)(?:\.[A-Za-z_]\w*)+")
BENCH = re.compile(r"(?<![\w./-])bench/(\w+)\.py([^`#;|)]*)")
MAKE = re.compile(r"(?<![\w-])make ([a-z][\w-]*)")
OPTION = re.compile(r"(?<![\w-])--[a-z][\w-]*")
# `model.safetensors`, `train.py`: file names, not keys (no key of the schema ends so)
FILE_NAME = re.compile(
    r"\.(py|json|jsonl|ya?ml|toml|md|txt|html|png|jpe?g|tar|parquet|csv|safetensors|bin|pth?|ckpt)$"
)
LINK = re.compile(r"\]\(([^)\s]+)\)")
INLINE_YAML = re.compile(rf"^\s*(?:{'|'.join(SECTIONS)})[\w.]*\s*:\s")


@dataclass
class Found:
    """What the documents name, each with the places (file:line) that name it."""

    keys: dict[str, list[str]] = field(default_factory=dict)
    paths: dict[str, list[str]] = field(default_factory=dict)
    modules: dict[str, list[str]] = field(default_factory=dict)
    targets: dict[str, list[str]] = field(default_factory=dict)
    bench: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # script → option → places
    sections: list[tuple[str, str, object]] = field(
        default_factory=list
    )  # YAML: place, name, value


def code_pieces(text: str) -> list[tuple[int, str, str]]:
    """(line, language, code) for each fenced block (language '') and each inline code span."""
    pieces, fence, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence, start, lines = stripped[3:].strip() or "text", number, []
        elif fence is not None and stripped.startswith("```"):
            pieces.append((start + 1, fence, "\n".join(lines)))
            fence = None
        elif fence is not None:
            lines.append(line)
        else:
            pieces += [(number, "", span) for span in re.findall(r"`([^`]+)`", line)]
    return pieces


def flatten(value: object, prefix: str = "") -> list[str]:
    """Dotted keys of a YAML mapping; a list of mappings adds no segment (`filter.classifiers`)."""
    if isinstance(value, list):
        return [key for item in value for key in flatten(item, prefix)]
    if not isinstance(value, dict):
        return [prefix] if prefix else []
    keys = []
    for name, inner in value.items():
        path = f"{prefix}.{name}" if prefix else str(name)
        keys += [path] if isinstance(inner, dict | list) and not inner else []
        keys += flatten(inner, path)
    return keys


def yaml_keys(code: str) -> list[str]:
    try:
        data = yaml.safe_load(code)
    except yaml.YAMLError:
        return []
    return [key for key in flatten(data) if key.split(".")[0] in SECTIONS]


def _sections(code: str, place: str) -> list[tuple[str, str, object]]:
    try:
        data = yaml.safe_load(code)
    except yaml.YAMLError:
        return [(place, "", "not valid YAML")]
    if not isinstance(data, dict):
        return []
    return [(place, key, value) for key, value in data.items() if key in SECTIONS]


def section_problem(section: str, value: object) -> str | None:
    """A YAML block's section must validate as that section (values, bounds; keys reported apart)."""
    if not section:
        return str(value)
    from pydantic import TypeAdapter, ValidationError

    from sdflow.config import RunConfig

    try:  # a TypeAdapter: `source` is optional (a profile may give `subsets` instead)
        TypeAdapter(RunConfig.model_fields[section].annotation).validate_python(value)
    except ValidationError as error:
        wrong = [e for e in error.errors() if e["type"] != "extra_forbidden"]
        if wrong:
            where = ".".join(str(part) for part in (section, *wrong[0]["loc"]))
            return f"`{where}`: {wrong[0]['msg']} (got {wrong[0]['input']!r})"
    return None


def collect(docs: list[Path]) -> Found:
    found = Found()
    for doc in docs:
        name = doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc
        for line, language, code in code_pieces(doc.read_text(encoding="utf-8")):
            if language in ("yaml", "yml") or (language == "" and INLINE_YAML.match(code)):
                _add(found.keys, yaml_keys(code), f"{name}:{line}")
            if language in ("yaml", "yml"):
                found.sections += _sections(code, f"{name}:{line}")
            for offset, text in enumerate(code.split("\n")):  # a block: each line its own place
                _collect_line(found, f"{name}:{line + offset}", text)
    return found


def _add(table: dict[str, list[str]], names: list[str], place: str) -> None:
    for name in names:
        table.setdefault(name, []).append(place)


def _collect_line(found: Found, place: str, code: str) -> None:
    _add(found.keys, [key for key in KEY.findall(code) if not FILE_NAME.search(key)], place)
    _add(found.paths, [path.rstrip(".") for path in PATH.findall(code)], place)
    _add(found.modules, MODULE.findall(code), place)
    _add(found.targets, MAKE.findall(code), place)
    for script, rest in BENCH.findall(code):
        options = found.bench.setdefault(script, {})
        _add(options, OPTION.findall(rest) or [""], place)


def key_problem(key: str, model: type | None = None) -> str | None:
    """Why `key` is not a path through the config schema, or None when it is."""
    if model is None:
        from sdflow.config import RunConfig

        model = RunConfig
    kinds: list[object] = [model]
    walked = []
    for name in key.split("."):
        if any(_free_keys(kind) for kind in kinds):
            return None  # a dict's own keys may hold dots (node labels such as nvidia.com/gpu)
        kinds = [inner for kind in kinds for inner in _field_types(kind, name)]
        if not kinds:
            where = ".".join(walked) or "the config"
            return f"{where} has no key {name!r}"
        walked.append(name)
    return None


def _free_keys(kind: object) -> bool:
    """Whether `kind` is a mapping whose keys are the user's (not schema fields)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType, typing.Annotated):
        return any(_free_keys(arg) for arg in typing.get_args(kind))
    if kind is dict:
        return True
    if typing.get_origin(kind) is not dict:
        return False
    args = typing.get_args(kind)  # a dict of settings (a model per key) keeps checking its fields
    return not args or getattr(args[1], "model_fields", None) is None


def _field_types(kind: object, name: str) -> list[object]:
    """The types one level below `kind` under `name` (none when `kind` has no such key)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType, list, tuple, set, typing.Annotated):
        return [
            inner
            for arg in args[: 1 if origin is typing.Annotated else None]
            for inner in _field_types(arg, name)
        ]
    if origin is dict:
        return [args[1] if args else typing.Any]
    if kind is typing.Any or kind is dict:
        return [typing.Any]
    fields = getattr(kind, "model_fields", None)
    if fields is not None and name in fields:
        return [fields[name].annotation]
    return []


def path_problem(path: str) -> str | None:
    target = path.split("::")[0]
    if any(char in target for char in "*{}<>"):
        return (
            None
            if any(ROOT.glob(target.replace("{", "*").replace("}", "*")))
            else "matches no file"
        )
    return None if (ROOT / target).exists() else "is not in the tree"


def module_problem(dotted: str) -> str | None:
    """A module path must be a file or package; the first name after it must be defined there."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if source.is_file():
            rest = parts[cut:]  # a name defined there (and maybe an attribute of it)
            if not rest or rest[0] in _top_level_names(source):
                return None
            return f"is no module, nor a name defined in {'.'.join(parts[:cut])}"
    return "is no module in the tree"


def _top_level_names(source: Path) -> set[str]:
    names = set()
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    lines = prose_lines(page.read_text(encoding="utf-8"))
    headings = [line.lstrip("#").strip() for _, line in lines if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def link_problems(docs: list[Path]) -> list[str]:
    """Local links: an image or anchor must exist; a missing .md page may come with another change."""
    problems = []
    for doc in docs:
        name = doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc
        for number, line in prose_lines(doc.read_text(encoding="utf-8")):
            for target in LINK.findall(line):
                if "://" in target or target.startswith("mailto:"):
                    continue
                file, _, anchor = target.partition("#")
                page = (doc.parent / file) if file else doc
                if not page.exists():
                    if page.suffix != ".md":
                        problems.append(f"{name}:{number}: link to {target}: no such file")
                elif anchor and page.suffix == ".md" and anchor not in anchors(page):
                    problems.append(f"{name}:{number}: link to {target}: no such heading")
    return problems


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][\w-]*):", text, flags=re.MULTILINE))


def bench_problems(bench: dict[str, dict[str, list[str]]]) -> list[str]:
    scripts = {name: ROOT / "bench" / f"{name}.py" for name in bench}  # a missing one: a bad path
    problems = []
    results = bench_help.run_helps([s for s in scripts.values() if s.is_file()])
    for name, options in sorted(bench.items()):
        if scripts[name] not in results:
            continue
        code, output = results[scripts[name]]
        first = next(iter(options.values()))[0]
        if code != 0:
            tail = "\n    ".join(output.strip().splitlines()[-4:])
            problems.append(f"{first}: `bench/{name}.py --help` exited {code}:\n    {tail}")
            continue
        for option, places in sorted(options.items()):
            if option and not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", output):
                problems.append(f"{places[0]}: bench/{name}.py has no option {option} (see --help)")
    return problems


def check(docs: list[Path]) -> tuple[list[str], Found]:
    found = collect(docs)
    problems = []
    for key, places in sorted(found.keys.items()):
        if why := key_problem(key):
            problems.append(f"{places[0]}: profile key `{key}` is not in the schema: {why}")
    for path, places in sorted(found.paths.items()):
        if why := path_problem(path):
            problems.append(f"{places[0]}: `{path}` {why}")
    for module, places in sorted(found.modules.items()):
        if why := module_problem(module):
            problems.append(f"{places[0]}: `{module}` {why}")
    for place, section, value in found.sections:
        if why := section_problem(section, value):
            problems.append(f"{place}: YAML block does not validate: {why}")
    targets = make_targets()
    for target, places in sorted(found.targets.items()):
        if target not in targets:
            problems.append(f"{places[0]}: `make {target}`: the Makefile has no such target")
    return problems + link_problems(docs) + bench_problems(found.bench), found


def main(argv: list[str]) -> int:
    global ROOT
    started = time.perf_counter()
    sys.path.insert(0, str(REPO))  # this tree's sdflow, tasks, flows
    if argv[:1] == ["--root"]:
        ROOT, argv = Path(argv[1]).resolve(), argv[2:]
    docs = [Path(a).resolve() for a in argv]
    docs = docs or [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems, found = check(docs)
    for problem in problems:
        print(problem)
    counts = (
        f"{len(found.keys)} keys, {len(found.paths)} paths, {len(found.modules)} modules, "
        f"{len(found.bench)} bench scripts"
    )
    verdict = f"{len(problems)} problems" if problems else "ok"
    took = time.perf_counter() - started
    print(f"docs-check: {len(docs)} documents, {counts}: {verdict} ({took:.1f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
