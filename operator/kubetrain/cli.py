"""`kubetrain`: run, validate and render training specs, write the CRDs, run the operator.

    kubetrain run examples/trainingrun-sft-tiny.yaml       train here, no cluster
    kubetrain run examples/pipeline-tiny.yaml [--rerun]    run a pipeline's stages here
    kubetrain run examples/sweep-tiny.yaml                 a hyperparameter sweep here
    kubetrain validate examples/*.yaml                     check files without running them
    kubetrain validate --preflight FILE --gpu-memory 80Gi  will it fit? memory per GPU
    kubetrain render examples/trainingrun-sft-tiny.yaml    the objects the operator creates
    kubetrain report outputs/pipeline-tiny                 a run's or pipeline's summary
    kubetrain generate outputs/sft-tiny --chat             talk to a trained model or adapter
    kubetrain crds                                         regenerate crds/ from the API types
    kubetrain operator                                     run the operator (in a cluster)
    kubetrain submit FILE [--wait|--follow]                create or update them on a cluster
    kubetrain get [runs|pipelines|sweeps] [NAME] [-w]      what runs there, with progress
    kubetrain describe|logs [-f]|wait|suspend|resume|delete NAME   one of them
    kubetrain --version --verbose                          versions of kubetrain and its libraries

Errors name the file, the object and the field, and exit 2; a failed training run (or a
pipeline's failed stage) exits with the trainer's code (78 bad config or data, 75
preempted after a checkpoint).
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from kubetrain.api import (
    Pipeline,
    Sweep,
    TrainingRun,
    dependency_order,
    load_documents,
    stage_output_uri,
)
from kubetrain.api.trainingrun import check_quantity, quantity_value
from kubetrain_trainer.config import ConfigError
from kubetrain_trainer.contract import REPORT_FILE

EXIT_USAGE = 2


class _ManifestDumper(yaml.SafeDumper):
    """YAML like kubectl prints it: multi-line strings (the TrainerConfig) as `|` blocks."""


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str_presenter)


def cmd_run(args: argparse.Namespace) -> int:
    for obj in load_documents(args.file):
        if isinstance(obj, Pipeline):
            exit_code = _run_pipeline(obj, args)
        elif isinstance(obj, Sweep):
            exit_code = _run_sweep(obj)
        else:
            exit_code = _run_trainingrun(obj, args)
        if exit_code:
            return exit_code
    return 0


def _run_trainingrun(run: TrainingRun, args: argparse.Namespace) -> int:
    from kubetrain.local import run_locally

    print(f"==> TrainingRun {run.metadata.name} ({run.spec.method})", flush=True)
    result = run_locally(run, metrics_port=args.metrics_port)
    if result.interrupted_by is not None:
        return result.exit_code  # the runner said where the checkpoint is, in one line
    if not result.succeeded:
        print(
            f"TrainingRun {run.metadata.name} failed (exit {result.exit_code}); "
            f"output kept in {result.output_dir}",
            file=sys.stderr,
        )
        advice = failure_advice(run, result.exit_code)
        if advice:
            print(advice, file=sys.stderr)
        return result.exit_code
    print(f"==> {run.metadata.name} done: model in {result.output_dir}", flush=True)
    if (result.output_dir / REPORT_FILE).is_file():
        print(f"report: {result.output_dir / REPORT_FILE}", flush=True)
    return 0


def _run_pipeline(pipeline: Pipeline, args: argparse.Namespace) -> int:
    from kubetrain.local import run_pipeline_locally

    stages = len(pipeline.spec.stages)
    print(f"==> Pipeline {pipeline.metadata.name} ({stages} stages)", flush=True)
    result = run_pipeline_locally(pipeline, rerun=args.rerun, metrics_port=args.metrics_port)
    for stage in result.failed:
        print(
            f"Pipeline {pipeline.metadata.name}: stage {stage.stage} failed "
            f"(exit {stage.exit_code}); output kept in {stage.output_dir}",
            file=sys.stderr,
        )
    if result.report is not None:
        print(f"report: {result.report}", flush=True)
    return result.exit_code


def _run_sweep(sweep: Sweep) -> int:
    from kubetrain.api.sweep import TRIAL_RUNNING
    from kubetrain.local import run_sweep_locally

    search = sweep.spec
    print(
        f"==> Sweep {sweep.metadata.name}: {search.trials_planned()} trials, "
        f"{search.parallelism} at a time, {search.algorithm}, "
        f"{search.objective.direction} {search.objective.metric}",
        flush=True,
    )
    result = run_sweep_locally(sweep)
    if result.interrupted_by is not None:
        running = sum(t.state == TRIAL_RUNNING for t in result.trials)
        print(
            f"interrupted; {running} running trial(s) stopped, each with a checkpoint in its "
            "output; run the same command again to search again",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(f"==> Sweep {sweep.metadata.name} {result.phase}: {result.message}", flush=True)
    if result.best is not None:
        print(f"best: {result.best.name} {json.dumps(result.best.parameters)}", flush=True)
    if result.report is not None:
        print(f"report: {result.report}", flush=True)
    return result.exit_code


def failure_advice(run: TrainingRun, exit_code: int) -> str | None:
    """The guide's remedies for a run that ran out of memory or went unstable here."""
    from kubetrain_trainer.advice import memory_advice, stability_advice
    from kubetrain_trainer.contract import ExitCode

    if exit_code == ExitCode.TRAINING_UNSTABLE:
        return stability_advice(run.spec)
    if exit_code == ExitCode.DEVICE_OUT_OF_MEMORY:
        return memory_advice(run.spec)
    return None


def cmd_validate(args: argparse.Namespace) -> int:
    gpu_memory = None
    if args.gpu_memory is not None:
        try:
            gpu_memory = quantity_value(check_quantity(args.gpu_memory))
        except ValueError as e:
            raise ConfigError(f"--gpu-memory: {e}") from e
    does_not_fit = False
    for file in args.files:
        for obj in load_documents(file):
            print(f"{file}: {obj.kind} {obj.metadata.name}: valid")
            if args.preflight:
                runs = pipeline_stage_runs(obj) if isinstance(obj, Pipeline) else [obj]
                for run in runs:
                    if isinstance(run, TrainingRun) and run.spec.method != "evaluate":
                        line, fits = preflight_line(run, gpu_memory)
                        print(f"  {run.metadata.name}: {line}")
                        does_not_fit = does_not_fit or not fits
    return 1 if does_not_fit else 0


def preflight_line(run: TrainingRun, gpu_memory: float | None) -> tuple[str, bool]:
    """The memory estimate of one run and whether it fits the GPU size given (or the one its
    node selector names), as the trainer's own preflight would judge it."""
    from kubetrain_trainer.advice import memory_advice
    from kubetrain_trainer.preflight import (
        GPU_PRODUCT_LABEL,
        KNOWN_GPUS,
        does_not_fit_message,
        estimate_memory,
        gib,
    )

    shape = model_shape(run)
    if isinstance(shape, str):
        return f"preflight: no estimate ({shape})", True
    spec = run.spec
    processes = spec.resources.nodes * spec.resources.proc_per_node
    estimate = estimate_memory(
        spec.method, spec.model, spec.training, spec.data, spec.lora, spec.dpo, shape, processes
    )
    short_of_host = host_memory_shortfall(spec, estimate.host)
    if short_of_host:
        return short_of_host, False
    product = spec.resources.node_selector.get(GPU_PRODUCT_LABEL)
    if gpu_memory is None and product in KNOWN_GPUS:
        gpu_memory = KNOWN_GPUS[product]
    if gpu_memory is None:
        return f"preflight: {estimate.summary()} (pass --gpu-memory to compare)", True
    if not estimate.fits(gpu_memory):
        return does_not_fit_message(estimate, gpu_memory, memory_advice(spec)), False
    return f"preflight: {estimate.summary()}; fits a {gib(gpu_memory)} GPU", True


def host_memory_shortfall(spec: Any, host_per_process: float) -> str | None:
    """Why a pod's memory request cannot hold what fsdpCpuOffload keeps on the host."""
    from kubetrain.api.trainingrun import quantity_value
    from kubetrain_trainer.preflight import gib

    asked = spec.resources.requests.get("memory") or spec.resources.limits.get("memory")
    if not host_per_process or asked is None:
        return None
    need = host_per_process * spec.resources.proc_per_node
    if quantity_value(asked) >= need:
        return None
    return (
        f"preflight: training.fsdpCpuOffload keeps ~{gib(need)} per pod in host memory "
        f"({spec.resources.proc_per_node} processes x {gib(host_per_process)} of sharded "
        f"weights, gradients and optimizer states), more than resources memory {asked}; "
        "request more memory, or spread the run over more nodes"
    )


def model_shape(run: TrainingRun) -> Any:
    """The run's model shape, or why it cannot be known here (a str)."""
    from kubetrain_trainer.preflight import KNOWN_MODELS, ModelShape, read_model_shape

    model = run.spec.model
    if model.architecture is not None:
        return ModelShape.of_architecture(model.architecture)
    name = model.name or ""
    if name in KNOWN_MODELS:
        return ModelShape.of_config(KNOWN_MODELS[name])
    if name.startswith("pvc://"):
        return f"{name} is on a cluster volume; copy its config.json here to estimate"
    folder = Path(name)
    if (folder / "config.json").is_file():
        return read_model_shape(folder)
    try:
        from huggingface_hub import hf_hub_download

        config = hf_hub_download(name, "config.json", revision=model.revision)
    except Exception as e:  # no network, no such repo, gated: say which and go on
        return f"the config.json of {name} cannot be read here: {type(e).__name__}"
    return read_model_shape(Path(config).parent)


def cmd_render(args: argparse.Namespace) -> int:
    from kubetrain.render import render_trainingrun

    objects = []
    for obj in load_documents(args.file):
        if isinstance(obj, Pipeline):
            # A pipeline's own children are its stages' TrainingRuns, each upstream model
            # shown as the output the stage will write.
            objects += [_as_manifest(run) for run in pipeline_stage_runs(obj)]
        else:
            objects += render_trainingrun(obj, args.attempt, backend=args.backend)
    sys.stdout.write(yaml.dump_all(objects, Dumper=_ManifestDumper, sort_keys=False))
    return 0


def pipeline_stage_runs(pipeline: Pipeline) -> list[TrainingRun]:
    """Every stage's TrainingRun in dependency order, upstream models at their outputs."""
    from kubetrain.pipelines import stage_run

    spec = pipeline.spec
    outputs = {s.name: stage_output_uri(spec, s.name) for s in spec.stages}
    return [stage_run(pipeline, name, outputs) for name in dependency_order(spec.stages)]


def _as_manifest(run: TrainingRun) -> dict:
    return run.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})


def cmd_report(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from kubetrain_trainer.report import ReportError, ensure_report

    try:
        report = ensure_report(args.output_dir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Ctrl-C while no trainer runs (loading, reading, following): nothing to save.
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    # Text cells, never markup: run and stage names are the user's and may hold "[...]".
    table = Table(title=Text(report.title))
    for column in report.table.columns:
        table.add_column(Text(column))
    for row in report.table.rows:
        table.add_row(Text(row.label), *(Text(cell) for cell in row.cells))
    Console().print(table)
    # Plain print: rich would wrap a long path at the terminal's width.
    print(f"report: {report.path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompt is None and not args.chat:
        raise ConfigError("generate: give a PROMPT to continue, or --chat to talk to the model")
    from kubetrain_trainer.generate import (
        Sampling,
        chat,
        complete,
        cued_lines,
        load_for_generation,
        resolve_sources,
    )

    sampling = Sampling(args.max_new_tokens, args.temperature, args.seed)
    sources = resolve_sources(args.model, adapter=args.adapter, base=args.base)
    try:
        model, tokenizer = load_for_generation(sources, chat=args.chat)
        if not args.chat:
            complete(model, tokenizer, args.prompt, sampling)
            return 0
        # A person at a terminal gets a cue before each turn; piped input does not.
        lines = cued_lines(sys.stdin) if sys.stdin.isatty() else sys.stdin
        turns = itertools.chain([args.prompt] if args.prompt else [], lines)
        chat(model, tokenizer, turns, sampling)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130  # the shell's code for Ctrl-C
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    from kubetrain.crdgen import write_crds

    for path in write_crds(args.out):
        print(f"wrote {path}")
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from kubetrain.handlers import limit_malloc_arenas, run_operator

    limit_malloc_arenas()
    run_operator(
        namespaces=args.namespace or None,
        metrics_port=args.metrics_port,
        liveness_port=args.liveness_port,
        **({"reconcile_interval": args.reconcile_interval} if args.reconcile_interval else {}),
        peering=args.peering,
        # Alone, never join a peering object named "default" that other kopf operators use.
        standalone=None if args.peering else True,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubetrain",
        description="Train LLMs with TrainingRun specs, here or on Kubernetes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    p.add_argument("--version", action="store_true", help="print kubetrain's version and exit")
    p.add_argument(
        "--verbose", action="store_true",
        help="with --version: also the versions of torch, transformers, trl, peft, "
        "accelerate, kopf and kubernetes",
    )  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a TrainingRun, Pipeline or Sweep on this machine")
    run.add_argument("file", type=Path)
    run.add_argument(
        "--metrics-port", type=int, default=None,
        help="serve Prometheus metrics here (default: the spec's, 9400; 0 = off)",
    )  # fmt: skip
    run.add_argument(
        "--rerun", action="store_true",
        help="pipelines: train every stage again, even those whose output holds a finished "
        "model (by default their models are reused)",
    )  # fmt: skip
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check spec files without running them")
    validate.add_argument("files", type=Path, nargs="+")
    validate.add_argument(
        "--preflight", action="store_true",
        help="also estimate each run's memory per GPU (weights, gradients, optimizer states, "
        "activations) and exit 1 if one cannot fit",
    )  # fmt: skip
    validate.add_argument(
        "--gpu-memory", default=None, metavar="QUANTITY",
        help="the GPU size to compare with, e.g. 80Gi (default: the nvidia.com/gpu.product "
        "of the run's nodeSelector, when it is a known one)",
    )  # fmt: skip
    validate.set_defaults(func=cmd_validate)

    render = sub.add_parser("render", help="print the Kubernetes objects for a spec")
    render.add_argument("file", type=Path)
    render.add_argument("--backend", choices=["job", "jobset"], default=None)
    render.add_argument("--attempt", type=int, default=1, help="attempt number (default 1)")
    render.set_defaults(func=cmd_render)

    report = sub.add_parser(
        "report",
        help="summarize a finished run or pipeline and print where its HTML report is",
        description="Print the summary table of the run (or pipeline) whose output is "
        "OUTPUT_DIR and the path of its HTML report, writing the report first if the output "
        "has none (an older one). A pipeline's folder is its outputRoot.",
    )
    report.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR")
    report.set_defaults(func=cmd_report)

    generate = sub.add_parser(
        "generate",
        help="generate from a trained model, a LoRA adapter or a merged model",
        description="Load MODEL (a run's output: a model folder, a LoRA adapter folder or "
        "its merged/ folder; or a hub id) and continue PROMPT, or with --chat answer one "
        "user turn per stdin line; tokens stream to stdout as they are decoded.",
    )
    generate.add_argument("model", metavar="MODEL")
    generate.add_argument(
        "prompt", nargs="?", metavar="PROMPT",
        help="text to continue as it is (no chat template); with --chat, the first user turn",
    )  # fmt: skip
    generate.add_argument(
        "--adapter", metavar="DIR", help="put this LoRA adapter on MODEL, MODEL being its base"
    )
    generate.add_argument(
        "--base", metavar="MODEL",
        help="when MODEL is a LoRA adapter folder, load it on this base instead of the one "
        "its adapter_config.json names",
    )  # fmt: skip
    generate.add_argument(
        "--chat", action="store_true",
        help="talk: each stdin line is a user turn, the conversation is kept and rendered "
        "with the tokenizer's chat template (ChatML when it has none)",
    )  # fmt: skip
    generate.add_argument(
        "--max-new-tokens", type=int, default=64, metavar="N", help="longest reply (default 64)"
    )
    generate.add_argument(
        "--temperature", type=float, default=0.0, metavar="T",
        help="0 (the default) decodes greedily, the same reply every time; above 0 samples",
    )  # fmt: skip
    generate.add_argument(
        "--seed", type=int, default=None, metavar="N", help="seed sampling, to replay it"
    )
    generate.set_defaults(func=cmd_generate)

    crds = sub.add_parser("crds", help="write the CRDs generated from the API types")
    crds.add_argument("--out", type=Path, default=Path("crds"))
    crds.set_defaults(func=cmd_crds)

    operator = sub.add_parser("operator", help="run the operator (uses the current kube context)")
    operator.add_argument("--namespace", action="append", help="watch only this namespace")
    operator.add_argument("--metrics-port", type=int, default=8080)
    operator.add_argument("--liveness-port", type=int, default=8081)
    operator.add_argument(
        "--reconcile-interval", type=float, default=None, metavar="SECONDS",
        help="seconds between checks of each running TrainingRun (default 10)",
    )  # fmt: skip
    operator.add_argument(
        "--peering", metavar="NAME",
        help="one of several replicas: coordinate through kopf's peering object NAME, where "
        "the replica with the highest (random) priority works and the others stand by "
        "(default: a single, standalone operator)",
    )  # fmt: skip
    operator.set_defaults(func=cmd_operator)
    _add_cluster_parsers(sub)
    return p


# Libraries whose versions decide how a run behaves, shown by `--version --verbose`.
VERSIONED_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "kopf", "kubernetes")


def installed_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"  # the operator image has no torch; a laptop may lack kopf


def version_text(verbose: bool) -> str:
    """`kubetrain <version>`, and with `verbose` one line per library that shapes a run."""
    lines = [f"kubetrain {installed_version('kubetrain')}"]
    if verbose:
        lines += [f"{name} {installed_version(name)}" for name in VERSIONED_LIBRARIES]
    return "\n".join(lines)


def _add_cluster_parsers(sub: Any) -> None:
    try:
        from kubetrain.cluster_cli import add_parsers
    except ImportError:  # the kubernetes client is the operator extra's: laptop-only installs
        return
    add_parsers(sub)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--version" in argv[:2]:
        # Before parsing: a command is required otherwise.
        print(version_text(verbose="--verbose" in argv[:2]))
        return 0
    p = parser()
    args, extras = p.parse_known_args(argv)
    # argparse fills generate's optional PROMPT with nothing when an option stands between
    # MODEL and it (`generate MODEL --adapter DIR "prompt"`), then calls the prompt
    # unrecognized; take it from there.
    prompt_after_options = (
        args.command == "generate"
        and args.prompt is None
        and len(extras) == 1
        and not extras[0].startswith("-")
    )
    if prompt_after_options:
        args.prompt, extras = extras[0], []
    if extras:
        p.error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        return args.func(args)
    except ConfigError as e:
        # Also the cluster commands' refusals (k8s.ClientProblem: no context, no CRDs,
        # forbidden, not found): one line, never a traceback.
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Ctrl-C while no trainer runs (loading, reading, following): nothing to save.
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
