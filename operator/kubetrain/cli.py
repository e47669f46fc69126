"""`kubetrain`: run, validate and render training specs, write the CRDs, run the operator.

    kubetrain run examples/trainingrun-sft-tiny.yaml       train here, no cluster
    kubetrain validate examples/*.yaml                     check files without running them
    kubetrain render examples/trainingrun-sft-tiny.yaml    the objects the operator creates
    kubetrain crds                                         regenerate crds/ from the API types
    kubetrain operator                                     run the operator (in a cluster)

Errors name the file, the object and the field, and exit 2; a failed training run exits
with the trainer's code (78 bad config or data, 75 preempted after a checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from kubetrain.api import TrainingRun, load_documents
from kubetrain_trainer.config import ConfigError

EXIT_USAGE = 2


class _ManifestDumper(yaml.SafeDumper):
    """YAML like kubectl prints it: multi-line strings (the TrainerConfig) as `|` blocks."""


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str_presenter)


def cmd_run(args: argparse.Namespace) -> int:
    from kubetrain.local import run_locally

    objects = load_documents(args.file)
    for obj in objects:
        if not isinstance(obj, TrainingRun):
            raise ConfigError(f"{args.file}: kubetrain run does not handle {obj.kind} yet")
    for run in objects:
        print(f"==> TrainingRun {run.metadata.name} ({run.spec.method})", flush=True)
        result = run_locally(run, metrics_port=args.metrics_port)
        if not result.succeeded:
            print(
                f"TrainingRun {run.metadata.name} failed (exit {result.exit_code}); "
                f"output kept in {result.output_dir}",
                file=sys.stderr,
            )
            return result.exit_code
        print(f"==> {run.metadata.name} done: model in {result.output_dir}", flush=True)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    for file in args.files:
        for obj in load_documents(file):
            print(f"{file}: {obj.kind} {obj.metadata.name}: valid")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from kubetrain.render import render_trainingrun

    objects = []
    for obj in load_documents(args.file):
        objects += render_trainingrun(obj, args.attempt, backend=args.backend)
    sys.stdout.write(yaml.dump_all(objects, Dumper=_ManifestDumper, sort_keys=False))
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    from kubetrain.crdgen import write_crds

    for path in write_crds(args.out):
        print(f"wrote {path}")
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from kubetrain.handlers import run_operator

    run_operator(
        namespaces=args.namespace or None,
        metrics_port=args.metrics_port,
        liveness_port=args.liveness_port,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubetrain",
        description="Train LLMs with TrainingRun specs, here or on Kubernetes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a TrainingRun on this machine")
    run.add_argument("file", type=Path)
    run.add_argument(
        "--metrics-port", type=int, default=None,
        help="serve Prometheus metrics here (default: the spec's, 9400; 0 = off)",
    )  # fmt: skip
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check spec files without running them")
    validate.add_argument("files", type=Path, nargs="+")
    validate.set_defaults(func=cmd_validate)

    render = sub.add_parser("render", help="print the Kubernetes objects for a spec")
    render.add_argument("file", type=Path)
    render.add_argument("--backend", choices=["job", "jobset"], default=None)
    render.add_argument("--attempt", type=int, default=1, help="attempt number (default 1)")
    render.set_defaults(func=cmd_render)

    crds = sub.add_parser("crds", help="write the CRDs generated from the API types")
    crds.add_argument("--out", type=Path, default=Path("crds"))
    crds.set_defaults(func=cmd_crds)

    operator = sub.add_parser("operator", help="run the operator (uses the current kube context)")
    operator.add_argument("--namespace", action="append", help="watch only this namespace")
    operator.add_argument("--metrics-port", type=int, default=8080)
    operator.add_argument("--liveness-port", type=int, default=8081)
    operator.set_defaults(func=cmd_operator)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
