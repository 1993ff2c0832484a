"""`sdflow`: run, check and list profiles, and build the demo.

    sdflow run PROFILE [--workdir DIR] [--set K=V]... [--only STAGE,...] [--refresh STAGE,...]
    sdflow check PROFILE [--set K=V]...
    sdflow profiles
    sdflow demo [--workdir DIR] [--finetune]
    sdflow deploy [--pool NAME] [--pool-type process|kubernetes] [--workdir DIR] [--gpus N]
    sdflow server [--workdir DIR] [--port PORT] | --background | --status | --stop
    sdflow gc [--keep-runs N] [--dry-run] [--workdir DIR]
    sdflow export RUN DEST [--link]
    sdflow sweep PROFILE --grid K=V1,V2 [--grid ...] [--metric M] [--random N] [--parallel N] [--set K=V]...

A user error (bad config, missing path, unwritable workdir) ends with one paragraph and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from sdflow.errors import UserError
from sdflow.ops.phases import mark

if TYPE_CHECKING:
    from sdflow.config import RunConfig, SourceConfig

DEMO_PROFILE, FINETUNE_PROFILE = "tiny-cpu", "tiny-cpu-finetune"

LIBRARY_LOGGERS = "sdflow,tasks,diffusers,accelerate,transformers"
DEFAULT_WORKDIR = "./sdflow-work"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"sdflow: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdflow: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdflow", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline flow on a profile")
    _add_profile_args(run)
    run.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where stage outputs and runs go")
    run.add_argument("--only", type=_stage_list, default=None, help="run only these stages")
    run.add_argument("--refresh", type=_stage_list, default=None, help="rebuild these stages")
    run.set_defaults(handler=_run)

    sweep = commands.add_parser("sweep", help="run the pipeline once per setting of a grid")
    _add_profile_args(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="K=V1,V2", required=True)
    sweep.add_argument("--metric", default="fid", help="rank the settings by this metric")
    sweep.add_argument("--random", type=_count, default=None, help="draw N settings instead")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the --random draws")
    sweep.add_argument(
        "--parallel",
        type=_count,
        default=None,
        help="settings trained at once (default: one per GPU slot on a CUDA host, else 1)",
    )
    sweep.add_argument("--workdir", default=DEFAULT_WORKDIR)
    sweep.set_defaults(handler=_sweep)

    check = commands.add_parser("check", help="validate a profile and the environment")
    _add_profile_args(check)
    check.set_defaults(handler=_check)

    profiles = commands.add_parser("profiles", help="list the profiles with their descriptions")
    profiles.set_defaults(handler=_profiles)

    demo = commands.add_parser("demo", help="build the demo dataset and run tiny-cpu on it")
    demo.add_argument("--workdir", default=DEFAULT_WORKDIR)
    demo.add_argument(
        "--finetune",
        action="store_true",
        help="the second demo: fine-tune the model `sdflow demo` trained on a new shape and colour",
    )
    demo.add_argument(
        "--profile",
        default=None,
        help="profile to run on the demo data (default: tiny-cpu, or tiny-cpu-finetune)",
    )
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    demo.set_defaults(handler=_demo)

    deploy = commands.add_parser("deploy", help="register the deployments with a Prefect server")
    deploy.add_argument("--pool", default="sdflow", help="work pool name (created if missing)")
    deploy.add_argument("--pool-type", choices=["process", "kubernetes"], default="process")
    deploy.add_argument("--workdir", default=None, help="workdir of the flow runs on the worker")
    deploy.add_argument("--code-dir", default=None, help="the sdflow checkout on the worker")
    deploy.add_argument("--gpus", type=int, default=None, help="gpu slots (default: this host's)")
    deploy.add_argument(
        "--pause-schedules", action="store_true", help="register the schedules inactive"
    )
    deploy.set_defaults(handler=_deploy)

    server = commands.add_parser("server", help="start a Prefect server and UI on 127.0.0.1")
    server.add_argument("--workdir", default=DEFAULT_WORKDIR, help="its SQLite database goes here")
    server.add_argument("--port", type=int, default=4200)
    lifecycle = server.add_mutually_exclusive_group()
    for flag, what in (
        ("--background", "start (or find) this PREFECT_HOME's background server, the runs' own"),
        ("--status", "say where this PREFECT_HOME's background server is, or that none runs"),
        ("--stop", "stop this PREFECT_HOME's background server"),
    ):
        lifecycle.add_argument(flag, action="store_true", help=what)
    server.set_defaults(handler=_server)

    gc = commands.add_parser("gc", help="remove stage outputs no kept run needs, and debris")
    gc.add_argument("--workdir", default=DEFAULT_WORKDIR)
    gc.add_argument(
        "--keep-runs", type=_count, default=5, help="keep what the newest N runs used (default 5)"
    )
    gc.add_argument("--dry-run", action="store_true", help="only say what would be freed")
    gc.set_defaults(handler=_gc)

    export = commands.add_parser("export", help="one folder to upload: a run's model and card")
    export.add_argument("run", help="the run directory, runs/<id> (`sdflow run` prints it last)")
    export.add_argument("dest", help="a new folder: the model, its exports, the evaluated card")
    export.add_argument("--link", action="store_true", help="hard-link the weights, not copy")
    export.set_defaults(handler=_export)
    return parser


def _add_profile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", help="a name in profiles/ or a path to a YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="K=V",
        help="override a config value, e.g. --set train.lr=1e-5 (repeatable)",
    )


def _stage_list(text: str) -> list[str]:
    from sdflow.config import STAGES  # the schema (pydantic) only when a stage list is given

    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}"
        )
    return stages


def _run(args: argparse.Namespace) -> int:
    mark("cli")
    config = _validated(args.profile, args.overrides)
    workdir = _ready_workdir(args.workdir)
    _check_source(config)
    run_dir = _run_flow(args.profile, args.overrides, workdir, args.only, args.refresh, config)
    print(run_dir)
    return 0


def _prepare_flow_logging() -> None:
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", LIBRARY_LOGGERS)
    # The ephemeral server's telemetry heartbeat races its own SQLite writes ("database is locked").
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for name in ("sdflow", "tasks"):
        logging.getLogger(name).setLevel(logging.INFO)  # stage progress reaches the run's log


def _run_flow(profile, overrides, workdir, only, refresh, config: RunConfig) -> str:
    _prepare_flow_logging()
    from flows.pipeline import pipeline  # Prefect is imported only when a flow runs

    mark("imported")
    # Result storage comes from the profile inside the flow (flows/tracking.py), so deployments and
    # `prefect flow-run retry` use the same cache records as this command.
    from sdflow.ops.background import flow_api

    with flow_api():
        mark("api")
        run_dir = pipeline(
            profile=str(profile),
            overrides=list(overrides),
            workdir=str(workdir),
            only=only,
            refresh=refresh,
        )
    mark("returned")
    # The ephemeral API server logs its shutdown at exit; keep the run directory the last line.
    logging.getLogger("prefect").setLevel(logging.WARNING)
    return run_dir


def _sweep(args: argparse.Namespace) -> int:
    from sdflow.ops import sweeps

    grid = sweeps.parse_grid(args.grid)
    sweeps.plan(args.profile, grid, args.metric, args.overrides, args.random, args.seed)
    if args.parallel is not None:
        sweeps.parallelism(args.parallel, gpu_slots=0, cuda=False)  # 0 refused before any work
    workdir = _ready_workdir(args.workdir)
    _check_source(_validated(args.profile, args.overrides))
    _prepare_flow_logging()
    from flows.sweep import sweep
    from sdflow.ops.background import flow_api

    with flow_api():  # the background server, as for `sdflow run`
        summary = sweep(
            profile=str(args.profile),
            grid=grid,
            metric=args.metric,
            overrides=list(args.overrides),
            workdir=str(workdir),
            random=args.random,
            seed=args.seed,
            parallel=args.parallel,
        )
    logging.getLogger("prefect").setLevel(logging.WARNING)
    print(summary)
    return 0


def _check(args: argparse.Namespace) -> int:
    config = _validated(args.profile, args.overrides)
    _check_source(config)
    from sdflow.models.formats.preflight import check_model_files
    from sdflow.ops.environment import describe_environment

    check_model_files(config)  # a train.init_lora that does not fit the base, as `run` refuses it

    print(config.model_dump_json(indent=2))
    for line in describe_environment(config):
        print(line)
    return 0


def _profiles(args: argparse.Namespace) -> int:
    from sdflow.profiles import profile_description, profile_names

    names = profile_names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {profile_description(name)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sdflow.data.sources.demo import FINETUNE_EXTRAS, make_demo_dataset

    workdir = _ready_workdir(args.workdir)
    if args.finetune:
        profile = args.profile or FINETUNE_PROFILE
        base = demo_model(workdir)  # first: without a first demo there is nothing to fine-tune
        data = workdir / "demo-finetune-data"
        overrides = [f"source.path={data}", f"model.pretrained={base}", *args.overrides]
        config = _validated(profile, overrides)  # a bad --set fails before any images are drawn
        make_demo_dataset(data, seed=1, **FINETUNE_EXTRAS)
    else:
        profile = args.profile or DEMO_PROFILE
        data = workdir / "demo-data"
        overrides = [f"source.path={data}", *args.overrides]
        config = _validated(profile, overrides)
        make_demo_dataset(data)
    run_dir = _run_flow(profile, overrides, workdir, None, None, config)
    print(run_dir)
    return 0


def demo_model(workdir: Path) -> str:
    """The exported pipeline of the newest completed `sdflow demo` run (profile tiny-cpu) in
    `workdir`, whose model the fine-tune demo starts from."""
    from sdflow.store.gc import newest_runs

    for path in newest_runs(workdir, keep_runs=sys.maxsize):
        summary = json.loads(path.read_text())
        model_dir = summary.get("model_dir")
        if (
            summary.get("profile") == DEMO_PROFILE
            and summary.get("status") == "completed"
            and model_dir
            and (Path(model_dir) / "model_index.json").is_file()
        ):
            return model_dir
    raise UserError(
        f"No completed `sdflow demo` run (profile {DEMO_PROFILE}) with its model in {workdir}: "
        f"the fine-tune demo fine-tunes the model that demo trains. Run `sdflow demo --workdir "
        f"{workdir}` first, then `sdflow demo --finetune --workdir {workdir}`."
    )


def _deploy(args: argparse.Namespace) -> int:
    from sdflow.ops.deploy import deploy, plan_deploy

    plan = plan_deploy(
        args.pool, args.pool_type, args.workdir, args.code_dir, args.gpus, args.pause_schedules
    )
    for name in deploy(plan):
        print(f"deployment {name}")
    print(f"start a worker: prefect worker start --pool {plan.pool}")
    return 0


def _server(args: argparse.Namespace) -> int:
    if args.background or args.status or args.stop:
        return _background_server(args)
    from sdflow.ops.server import serve

    return serve(_ready_workdir(args.workdir), args.port)


def _background_server(args: argparse.Namespace) -> int:
    from sdflow.ops import background

    home = background.prefect_home()
    if args.stop:
        state = background.stop_server(home)
        print(f"stopped the server at {state['url']}" if state else f"no server runs for {home}")
        return 0
    if args.status:
        state = background.read_state(home)
        if state and background.healthy(state["url"]):
            print(f"running: export PREFECT_API_URL={state['url']}  (pid {state['pid']})")
            return 0
        print(f"no background server runs for {home}")
        return 1
    url = background.ensure_server(home)
    print(f"Prefect UI:  {url.removesuffix('/api')}")
    print(f"runs and workers: export PREFECT_API_URL={url}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from sdflow.store.gc import collect_garbage

    workdir = Path(args.workdir).resolve()
    for line in collect_garbage(workdir, args.keep_runs, args.dry_run).lines(workdir):
        print(line)
    return 0


def _export(args: argparse.Namespace) -> int:
    from sdflow.models.formats.export_folder import export_folder

    for line in export_folder(Path(args.run).resolve(), Path(args.dest).resolve(), args.link):
        print(line)
    return 0


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 0, got {text!r}")
    return int(text)


def _validated(profile: str, overrides: list[str]) -> RunConfig:
    from sdflow.profiles import load_profile

    return load_profile(profile, overrides)


def _ready_workdir(path: str) -> Path:
    workdir = Path(path).resolve()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".sdflow-write-probe-{uuid.uuid4().hex}"  # runs may start together
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"The workdir {workdir} cannot be written ({exc.strerror}). "
            "Choose another one with --workdir DIR."
        ) from None
    return workdir


def _check_source(config: RunConfig) -> None:
    """Fail before any work when a local source is missing (hub names are checked when loaded);
    with `subsets`, each subset's."""
    sources = [("source", config.source, "source")] if config.source is not None else []
    sources += [
        (f"subsets[{s.name}].source", s.source, f"subsets.{i}.source")
        for i, s in enumerate(config.subsets or [])
    ]
    for key, source, setting in sources:
        _check_one_source(source, key, setting)
        if config.train.masked_loss and source.kind == "folder":
            _check_mask_sizes(source, key)


def _check_mask_sizes(source: SourceConfig, key: str) -> None:
    """`train.masked_loss`: every NAME.mask.png of a folder has its image's size (headers only)."""
    from sdflow.data.masks import mask_size_mismatches
    from sdflow.data.sources.folder import scan

    layout = scan(source)
    pairs = [(layout.root / image, layout.root / mask) for image, mask in layout.masks.items()]
    if wrong := mask_size_mismatches(pairs):
        raise UserError(
            f"train.masked_loss: {len(wrong)} mask file(s) in {key}.path {source.path!r} are not "
            f"the size of their image ({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''}). "
            "A NAME.mask.png must have the size of its image NAME.*: resize or remove it."
        )


def _check_one_source(source: SourceConfig, key: str, setting: str) -> None:
    path = Path(source.path)
    if source.kind in ("folder", "urls") and not path.exists():
        hint = f" Point it at your data: --set {setting}.path=PATH."
        if "demo-data" in source.path:
            hint = " Build the demo dataset with `sdflow demo`."
        raise UserError(
            f"{key}.path {source.path!r} does not exist ({key}.kind is {source.kind!r}).{hint}"
        )
    if source.kind == "urls" and not path.is_file():
        raise UserError(
            f"{key}.path {source.path!r} must be a URL-list file (csv, jsonl, parquet)."
        )
    if source.kind == "webdataset":
        from sdflow.data.sources.webdataset import shard_paths

        shard_paths(source)  # every pattern must match a tar


if __name__ == "__main__":
    sys.exit(main())
