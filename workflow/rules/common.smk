# Config validation, tracking set-up and input functions shared by every rule.
import json
import os
import shlex
import subprocess

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from sslpipe.config import ConfigError, check, config_hash
from sslpipe.tracking import ENV as TRACKING_ENV, settings_from_config

min_version("8.0")

# Fill defaults and reject bad values before any job starts.
validate(config, schema="../schemas/config.schema.yaml")
try:
    check(config)
except ConfigError as exc:
    raise WorkflowError(str(exc))

DATASET = config["data"]["name"] or config["data"]["source"]
METHODS = config["methods"]
SEEDS = config["seeds"]
BASELINES = config["evaluate"]["baselines"]
PRETRAIN_PROCESSES = config["pretrain"]["processes"]
CONFIG_HASH = config_hash(config)

# Tracking settings reach jobs through the environment, not params: pointing MLflow elsewhere
# must not re-run the pipeline.
os.environ[TRACKING_ENV] = json.dumps(settings_from_config(config, CONFIG_HASH))

wildcard_constraints:
    dataset=r"[A-Za-z0-9_.-]+",
    method="|".join(METHODS) or "none",
    baseline="|".join(BASELINES) or "none",
    seed=r"\d+",

# The config keys each stage depends on. Passing only these as params means Snakemake re-runs
# exactly the jobs whose settings changed (params are a re-run trigger).
STAGE_KEYS = {
    "prepare": ["data"],
    "augment": ["augment"],
    "pretrain": ["model", "pretrain", "device", "precision", "channels_last"],
    "linear_eval": ["model", "evaluate", "device", "precision"],
}


def stage_config(stage, method=None):
    """The JSON config slice a stage's job receives (quoted into its command line)."""
    if stage == "report":
        return json.dumps(config, sort_keys=True)
    part = {key: config[key] for key in STAGE_KEYS[stage]}
    if method in METHODS:
        part[method] = config[method]
    if stage == "pretrain":  # the kNN monitor's settings, and no other evaluation key
        part["evaluate"] = {k: config["evaluate"][k] for k in ("knn_monitor_every", "knn_k", "knn_temperature")}
    return json.dumps(part, sort_keys=True)


def eval_config(wildcards):
    """The config slice an evaluation job receives. evaluate.knn_monitor_every is a pretraining
    setting and is left out, so changing it re-runs no evaluation. The supervised baseline
    trains like pretraining does, so it also gets the pretrain section and channels_last."""
    part = json.loads(stage_config("linear_eval"))
    part["evaluate"].pop("knn_monitor_every", None)
    if wildcards.get("baseline") == "supervised":
        # ...but not the process count: the baseline trains in one process whatever pretraining uses.
        pretrain = {k: v for k, v in config["pretrain"].items() if k != "processes"}
        part.update(pretrain=pretrain, channels_last=config["channels_last"])
    return json.dumps(part, sort_keys=True)


def pretrain_command(processes):
    """`python -m sslpipe pretrain ...`; with pretrain.processes = N > 1 the same arguments under
    `torchrun --standalone --nproc_per_node N -m` (DDP, one GPU per process; see
    src/sslpipe/distributed.py), each process told to use threads // N CPU threads (at least 1).
    One process gives exactly the command of earlier versions, so no job re-runs for it."""
    args = ("sslpipe pretrain --config {params.cfg:q} --threads THREADS --method {wildcards.method} "
            "--seed {wildcards.seed} --data-dir {params.data_dir:q} --policy {input.policy:q} "
            "--out-dir {params.out_dir:q} --checkpoint {params.checkpoint:q} > {log:q} 2>&1")
    if processes == 1:
        return f"python -m {args.replace('THREADS', '{threads}')}"
    n = int(processes)
    launch = shlex.join(["torchrun", "--standalone", "--nproc_per_node", str(n), "-m"])
    return f"{launch} {args.replace('THREADS', f'$(( {{threads}} > {n} ? {{threads}} / {n} : 1 ))')}"


def data_files(wildcards):
    base = f"results/{wildcards.dataset}/data"
    return {"train": f"{base}/train.npz", "test": f"{base}/test.npz", "manifest": f"{base}/manifest.json"}


def eval_outputs(dataset=DATASET):
    names = METHODS + BASELINES
    return expand("results/{dataset}/linear_eval/{name}/seed{seed}/metrics.json",
                  dataset=dataset, name=names, seed=SEEDS)


def report_inputs(wildcards):
    d = wildcards.dataset
    return {
        "metrics": eval_outputs(d),
        "predictions": [p.replace("metrics.json", "predictions.npz") for p in eval_outputs(d)],
        "previews": expand("results/{d}/augment/{m}/preview.png", d=d, m=METHODS),
        "histories": expand("results/{d}/pretrain/{m}/seed{s}/history.csv", d=d, m=METHODS, s=SEEDS),
        "manifest": f"results/{d}/data/manifest.json",
    }


def report_outputs():
    return [f"results/{DATASET}/report/report.html", f"results/{DATASET}/report/summary.csv"]


def tracking_hook(*args):
    if config["tracking"]["enabled"]:
        subprocess.run(["python", "-m", "sslpipe", *args, "--config", json.dumps(config)], check=True)


onstart:
    # Create the MLflow store, the experiment and the pipeline's parent run once, before any
    # job: several jobs creating a fresh SQLite store at once would corrupt it.
    tracking_hook("track-init")


onsuccess:
    tracking_hook("track-finish", "--status", "FINISHED")
    report = os.path.abspath(report_outputs()[0])
    if os.path.exists(report):
        print(f"\nReport:       {report}")
    if config["tracking"]["enabled"]:
        from sslpipe.tracking import settings, tracking_uri

        uri = tracking_uri(settings())
        print(f"MLflow store: {uri}  (browse: mlflow ui --backend-store-uri {uri})")


onerror:
    tracking_hook("track-finish", "--status", "FAILED")
