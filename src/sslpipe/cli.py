"""One command line for every stage: `sslpipe <stage> ...` (or `python -m sslpipe`). Rules call only this.

`--config` takes the resolved config (or the rule's slice of it) as JSON, as the Snakefile
passes it, or the path of a YAML config file, which is then validated and completed with the
schema's defaults (for running a stage by hand; its `tracking` section applies unless the
pipeline's SSLPIPE_TRACKING is set). `check-config` resolves a stack of files and `--config`
overrides exactly as the Snakefile does and prints what the jobs receive.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from sslpipe import config as config_mod
from sslpipe.progress import say


def load_config(text: str) -> dict:
    if text.lstrip().startswith("{"):
        return json.loads(text)
    cfg = config_mod.load(text)
    from sslpipe import tracking  # by hand: the file's tracking section, unless a pipeline set it

    os.environ.setdefault(tracking.ENV, json.dumps(tracking.settings_from_config(cfg, config_mod.config_hash(cfg))))
    return cfg


def _json_or_file(text: str) -> dict:
    """JSON given inline (as the rules pass it) or the path of a JSON file (by hand)."""
    return json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())


def _names(*keys: str) -> list[str]:
    """Allowed values of a schema array's items (methods, evaluate.baselines), without torch."""
    props = config_mod.load_schema()["properties"]
    return [v for k in keys for v in (props[k] if "." not in k else
                                      props[k.split(".")[0]]["properties"][k.split(".")[1]])["items"]["enum"]]


def _common(p: argparse.ArgumentParser, method: bool = False, seed: bool = False) -> None:
    p.add_argument("--config", required=True, help="resolved config as JSON, or a YAML config file")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (Snakemake's {threads})")
    if method:
        p.add_argument("--method", required=True, choices=_names("methods", "evaluate.baselines"))
    if seed:
        p.add_argument("--seed", type=int, required=True)


def build_parser() -> argparse.ArgumentParser:
    from sslpipe import __version__

    ap = argparse.ArgumentParser(prog="sslpipe", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"sslpipe {__version__}")
    sub = ap.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("check-config", help="resolve a config stack as Snakemake does; print what the jobs receive",
                       description="Merge the files in order (as snakemake --configfile A B), apply the "
                                   "--config overrides (coerced by the schema's types), fill the defaults and "
                                   "check everything, data and device included; print the resolved config as JSON.")
    p.add_argument("configs", nargs="*", metavar="FILE",
                   help="config files, later ones over earlier ones (default: config/config.yaml when present, "
                        "as the default profile gives Snakemake)")
    p.add_argument("--config", nargs="+", action="extend", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="overrides as snakemake --config takes them, e.g. seeds='[0,1,2]'")

    p = sub.add_parser("track-init", help="create the MLflow store, experiment and pipeline run")
    _common(p)

    p = sub.add_parser("track-finish", help="mark the pipeline run FINISHED or FAILED")
    _common(p)
    p.add_argument("--status", choices=["FINISHED", "FAILED"], required=True)

    p = sub.add_parser("track-replay", help="put the runs kept in mlflow-offline/ (MLflow was unreachable) into MLflow")
    p.add_argument("--dir", default="mlflow-offline", help="the records' directory (default: mlflow-offline here)")
    p.add_argument("--tracking-uri", help="where to put them (default: each record's own tracking URI)")

    p = sub.add_parser("prepare", help="load a dataset into uint8 arrays and a manifest")
    _common(p)
    p.add_argument("--out-dir", type=Path, required=True)

    p = sub.add_parser("augment", help="resolve a method's view policy; write preview and benchmark")
    _common(p, method=True, seed=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)

    p = sub.add_parser("pretrain", help="pretrain one method for one seed")
    _common(p, method=True, seed=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--policy", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="resume checkpoint, kept outside the outputs: resumed from when it matches, written "
                        "every pretrain.checkpoint_every epochs and on SIGTERM/SIGUSR1, deleted when done")

    p = sub.add_parser("linear-eval", help="linear probe and kNN on a frozen encoder, or a baseline")
    _common(p, method=True, seed=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--encoder", type=Path, help="encoder.pt; omit for the baselines 'pixels' and 'random'")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--predictions", type=Path, default=None,
                   help="predictions.npz: per test image, 1 if right, for each metric (paired intervals)")
    p.add_argument("--embedding", type=Path, required=True, help="embedding.png: PCA picture of the test features")
    p.add_argument("--summary", type=Path, default=None,
                   help="with --encoder: its pretraining's summary.json (its run id links the two MLflow runs)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="the supervised baseline's resume checkpoint (as pretrain's); other baselines ignore it")

    p = sub.add_parser("report", help="the HTML/Markdown report comparing methods")
    _common(p)
    p.add_argument("--inputs", type=_json_or_file, required=True,
                   help="every file the report reads, keyed (sslpipe.report.build_report), as JSON or a JSON file")
    p.add_argument("--out-dir", type=Path, required=True)

    p = sub.add_parser("compare", help="methods x metrics (mean ± std over seeds) from the MLflow store",
                       description="Compare linear_eval results across configs and pipeline runs, "
                                   "read back from MLflow. The latest run per (config hash, method, seed) counts.")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--experiment", action="append", help="experiment (config `name`); repeatable; default all")
    p.add_argument("--dataset", help="only this dataset")
    p.add_argument("--method", action="append", help="only this method or baseline; repeatable")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="only runs with this tag, e.g. sslpipe.git_commit=abc123; repeatable")
    p.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    p.add_argument("--against", action="append", metavar="BASELINE",
                   help="paired 95%% interval of each method against this baseline (repeatable; default random)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (config_mod.ConfigError, ValueError, FileNotFoundError, RuntimeError) as exc:
        for line in str(exc).splitlines() or [""]:
            print(f"sslpipe {args.stage}: error: {line}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from sslpipe import provenance, stages, tracking

    if args.stage == "compare":
        from sslpipe import compare

        print(compare.compare(args.tracking_uri, args.experiment, args.dataset, args.method,
                              compare.parse_tags(args.tag), args.format, args.against), end="")
        return 0
    if args.stage == "track-replay":
        from sslpipe import offline

        ids = offline.replay(args.dir, args.tracking_uri)
        print(f"replayed {len(ids)} run(s) from {args.dir}")
        return 0
    if args.stage == "check-config":
        files = args.configs or [f for f in ["config/config.yaml"] if Path(f).is_file()]
        cfg = config_mod.resolve_stack(files, config_mod.parse_overrides(args.overrides))
        print(json.dumps(cfg, indent=2, sort_keys=True))
        return 0
    cfg = load_config(args.config)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.stage == "track-init":
        info = tracking.init_pipeline(cfg, config_mod.config_hash(cfg), provenance.describe())
        print(json.dumps(info))
        return 0
    if args.stage == "track-finish":
        tracking.finish_pipeline(cfg, config_mod.config_hash(cfg), args.status)
        return 0
    method = getattr(args, "method", None)
    seed = getattr(args, "seed", None)
    stage = args.stage.replace("-", "_")
    track = None
    if stage == "pretrain":  # under torchrun: join the process group; rank 0 alone opens an MLflow run
        from sslpipe import distributed

        distributed.init(cfg["device"])
        if not distributed.is_main():
            track = contextlib.nullcontext(tracking.StageRun(None, None))  # logs nothing
    with track or tracking.stage_run(stage, method=method, seed=seed, params=cfg,
                                     provenance=provenance.describe()) as run:
        if run.run_id:  # where the job's metrics appear live (the MLflow UI's run page)
            say(f"MLflow run {run.run_id} ({stage}{'/' + method if method else ''}"
                f"{'' if seed is None else f'/seed{seed}'}) at {tracking.tracking_uri(tracking.settings())}")
        if stage == "prepare":
            stages.prepare(cfg, args.out_dir, run)
        elif stage == "augment":
            stages.augment(cfg, method, seed, args.data_dir, args.out_dir, run)
        elif stage == "pretrain":
            stages.pretrain(cfg, method, seed, args.data_dir, args.policy, args.out_dir, run,
                            checkpoint=args.checkpoint)
        elif stage == "linear_eval":
            stages.linear_eval(cfg, method, seed, args.data_dir, args.encoder, args.out, run,
                               predictions=args.predictions, checkpoint=args.checkpoint,
                               embedding=args.embedding, summary=args.summary)
        elif stage == "report":
            stages.report(cfg, args.inputs, args.out_dir, run)
    return 0
