# Config resolution, tracking set-up and input functions shared by every rule.
import glob
import json
import os
import re
import shlex
import subprocess
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from sslpipe import config as sslconfig
from sslpipe.tracking import ENV as TRACKING_ENV, settings_from_config

min_version("8.0")


def _label(path):
    """A config file as the user named it: relative to the working directory when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


# The config is the stack Snakemake was given: the --configfile files in order (the default
# profile gives config/config.yaml when none is named; the Snakefile names none, so a
# --configfile never inherits another file's values), then the --config overrides, coerced by
# the schema's types. `sslpipe check-config FILE... --config KEY=VALUE...` resolves the same
# stack the same way. Every problem (schema, combinations of keys, data, device) is one line
# naming the key and its file, printed before any job starts.
CONFIG_FILES = [_label(str(f)) for f in workflow.config_settings.configfiles]
try:
    _resolved = sslconfig.resolve_stack(CONFIG_FILES, dict(workflow.config_settings.config))
except sslconfig.ConfigError as exc:
    lines = str(exc).splitlines()
    print(f"sslpipe: {len(lines)} config problem(s), no job started:", *lines, sep="\n", file=sys.stderr)
    sys.exit(1)
config.clear()
config.update(_resolved)

# With --use-conda (--sdm conda) jobs run in workflow/envs/sslpipe.yaml, which holds the
# dependencies but not this package: jobs inherit this PYTHONPATH and import it from src/.
if "conda" in str(workflow.deployment_settings.deployment_method).lower():
    _src = os.path.join(workflow.basedir, "src")
    os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [_src, os.environ.get("PYTHONPATH")])))

NAME = config["name"]
METHODS = config["methods"]
SEEDS = config["seeds"]
BASELINES = config["evaluate"]["baselines"]
PRETRAIN_PROCESSES = config["pretrain"]["processes"]
PRETRAIN_NODES = config["pretrain"]["nodes"]
# Across nodes (pretrain.nodes > 1, SLURM only): one task (one torchrun) per node. `mpi` makes the
# SLURM executor run the rule's command in the batch script itself (on the first node), whose
# srun starts the tasks; tasks_per_gpu = 0 keeps it from turning `tasks` into --ntasks-per-gpu.
# Nothing at all for one node, so single-node jobs are submitted exactly as before.
PRETRAIN_NODE_RESOURCES = {} if PRETRAIN_NODES == 1 else {
    "nodes": PRETRAIN_NODES, "tasks": PRETRAIN_NODES, "tasks_per_gpu": 0, "mpi": "srun",
    "slurm_extra": "--ntasks-per-node=1"}
CONFIG_HASH = sslconfig.config_hash(config)

# Tracking settings reach jobs through the environment, not params: pointing MLflow elsewhere
# must not re-run the pipeline.
os.environ[TRACKING_ENV] = json.dumps(settings_from_config(config, CONFIG_HASH))

# Every output, log, benchmark and checkpoint lives under the config's name, so configs of
# different names run side by side; one name's unchanged jobs are reused across its runs.
wildcard_constraints:
    name=re.escape(NAME),
    method="|".join(METHODS) or "none",
    baseline="|".join(BASELINES) or "none",
    seed=r"\d+",

# Method keys the view policy (the augment job's output) never reads: training settings.
# Listed as exclusions so that a key added later re-runs augment rather than leaving a stale
# policy; tests/test_workflow.py checks that none of these changes a method's policy.
NOT_POLICY = {"pretrain", "temperature", "proj_hidden", "proj_dim", "momentum", "queue_size",
              "bn_groups", "bank_momentum", "lambda_", "num_negatives", "nce", "buffer_size",
              "reinit_fraction", "alpha", "energy_bound", "grad_clip", "negatives", "nce_weight",
              "collapse_ratio", "decoder", "decoder_width", "visible_weight", "norm_target"}
# The kNN monitor's settings: the monitor writes history.csv's knn_top1 column, an output.
MONITOR_KEYS = ("knn_monitor_every", "knn_k", "knn_temperature", "val_fraction")


def stage_slice(stage, method=None, baseline=None):
    """The config slice a job receives (as JSON on its command line, and as its params: a
    re-run trigger). It holds what the job's outputs depend on and nothing else."""
    c = config
    if stage == "prepare":
        return {"data": c["data"]}
    if stage == "augment":  # the view policy: views, plus a method's jigsaw / corruption / sampler
        return {"augment": c["augment"], method: {k: v for k, v in c[method].items() if k not in NOT_POLICY}}
    if stage == "pretrain":  # the shared training settings and the method's own (incl. {method}.pretrain)
        return {**{k: c[k] for k in ("model", "pretrain", "device", "precision", "channels_last")},
                method: c[method], "evaluate": {k: c["evaluate"][k] for k in MONITOR_KEYS}}
    if stage == "linear_eval":
        # Not the baseline list (which jobs exist is no setting of one job), nor the monitor's
        # period. Evaluation runs in fp32 whatever `precision` says; only the supervised
        # baseline trains, with the pretrain section (not its process count) and precision.
        ev = {k: v for k, v in c["evaluate"].items() if k not in ("knn_monitor_every", "baselines")}
        part = {"model": c["model"], "device": c["device"], "precision": "fp32", "evaluate": ev}
        if baseline == "supervised":
            part.update(pretrain={k: v for k, v in c["pretrain"].items() if k != "processes"},
                        channels_last=c["channels_last"], precision=c["precision"])
        return part
    if stage == "report":  # the report shows the whole config and its hash
        return c
    raise ValueError(stage)


def stage_config(stage, method=None, baseline=None):
    return json.dumps(stage_slice(stage, method, baseline), sort_keys=True)


def pretrain_command(processes, nodes=None):
    """`python -m sslpipe pretrain ...`; with pretrain.processes = N > 1 the same arguments under
    `torchrun --standalone --nproc_per_node N -m` (DDP, one GPU per process; see
    src/sslpipe/distributed.py), each process told to use threads // N CPU threads (at least 1).
    One process gives exactly the command of earlier versions, so no job re-runs for it.

    With pretrain.nodes = M > 1 (SLURM): `srun` starts one `torchrun --nnodes M --nproc_per_node N
    --rdzv-backend c10d` per node, all meeting at the rendezvous on the job's first node (where
    the batch script, and so this command, runs: $(hostname)), port 29400 + job id mod 1000."""
    nodes = config["pretrain"]["nodes"] if nodes is None else int(nodes)
    args = ("sslpipe pretrain --config {params.cfg:q} --threads THREADS --method {wildcards.method} "
            "--seed {wildcards.seed} --data-dir {params.data_dir:q} --policy {input.policy:q} "
            "--out-dir {params.out_dir:q} --checkpoint {params.checkpoint:q} > {log:q} 2>&1")
    if processes == 1 and nodes == 1:
        return f"python -m {args.replace('THREADS', '{threads}')}"
    n = int(processes)
    if nodes > 1:
        job = "${{SLURM_JOB_ID:-0}}"  # braces doubled: the rule's shell command is a format string
        launch = (f"srun --nodes {nodes} --ntasks {nodes} --ntasks-per-node 1 --cpus-per-task {{threads}} "
                  f"--kill-on-bad-exit=1 torchrun --nnodes {nodes} --nproc_per_node {n} --rdzv-backend c10d "
                  f'--rdzv-endpoint "$(hostname):$(( 29400 + {job} % 1000 ))" --rdzv-id "sslpipe-{job}" -m')
        return f"{launch} {args.replace('THREADS', f'$(( {{threads}} > {n} ? {{threads}} / {n} : 1 ))')}"
    launch = shlex.join(["torchrun", "--standalone", "--nproc_per_node", str(n), "-m"])
    return f"{launch} {args.replace('THREADS', f'$(( {{threads}} > {n} ? {{threads}} / {n} : 1 ))')}"


def data_files(wildcards):
    base = f"results/{wildcards.name}/data"
    return {"train": f"{base}/train.npz", "test": f"{base}/test.npz", "manifest": f"{base}/manifest.json"}


def pretrain_diagnostics(name, method, seed):
    """The figures a pretraining job wrote besides its declared outputs: its method's
    `diagnostics` (CD's energy histogram and negatives, DAE's energy curve and reconstructions).
    They are known only once the job ran, so pretrain is a checkpoint (pretrain.smk)."""
    job = checkpoints.pretrain.get(name=name, method=method, seed=seed)
    return sorted(set(glob.glob(os.path.join(os.path.dirname(job.output.encoder), "*.png"))) - set(job.output))


def report_files(name, diagnostics=pretrain_diagnostics):
    """Every file the report reads, keyed as `sslpipe report --inputs` takes them
    (sslpipe.report.build_report), each named by the rule that writes it (its output or
    benchmark): the report rule declares all of them (report_inputs, report_diagnostics) and
    passes this as --inputs."""
    def out(rule, key, **w):
        return expand(getattr(rules, rule).output[key], name=name, **w)[0]

    def bench(rule, **w):
        return expand(getattr(rules, rule).benchmark, name=name, **w)[0]

    evaluated = {**{m: ("linear_eval", "method") for m in METHODS}, **{b: ("baseline", "baseline") for b in BASELINES}}
    return {
        "manifest": out("prepare", "manifest"),
        "augment": {m: {k: out("augment", k, method=m) for k in ("policy", "preview", "benchmark")} for m in METHODS},
        "pretrain": {m: {s: {"summary": out("pretrain", "summary", method=m, seed=s),
                             "history": out("pretrain", "history", method=m, seed=s),
                             "diagnostics": diagnostics(name, m, s)} for s in SEEDS} for m in METHODS},
        "evaluations": {e: {s: {k: out(rule, k, seed=s, **{w: e}) for k in ("metrics", "predictions", "embedding")}
                            for s in SEEDS} for e, (rule, w) in evaluated.items()},
        # [stage, name, seed, TSV] per job: the report's wall-time table (never its own benchmark).
        "benchmarks": [["prepare", None, None, bench("prepare")]]
        + [["augment", m, None, bench("augment", method=m)] for m in METHODS]
        + [["pretrain", m, s, bench("pretrain", method=m, seed=s)] for m in METHODS for s in SEEDS]
        + [["linear_eval", e, s, bench(rule, seed=s, **{w: e})] for e, (rule, w) in evaluated.items() for s in SEEDS],
    }


def report_inputs(wildcards):
    """report_files as the rule's named inputs, so Snakemake tracks every file the report reads
    (tests/test_pipeline.py checks that these are exactly the files of --inputs). Without the
    diagnostics: they wait for the pretrain checkpoints, and the rest of the DAG must not."""
    f = report_files(wildcards.name, diagnostics=lambda *job: [])
    aug = list(f["augment"].values())
    pre = [job for seeds in f["pretrain"].values() for job in seeds.values()]
    ev = [job for seeds in f["evaluations"].values() for job in seeds.values()]
    return {
        "manifest": f["manifest"],
        "policies": [job["policy"] for job in aug],
        "previews": [job["preview"] for job in aug],
        "augment_benchmarks": [job["benchmark"] for job in aug],
        "summaries": [job["summary"] for job in pre],
        "histories": [job["history"] for job in pre],
        "metrics": [job["metrics"] for job in ev],
        "predictions": [job["predictions"] for job in ev],
        "embeddings": [job["embedding"] for job in ev],
        "benchmarks": [row[-1] for row in f["benchmarks"]],
    }


def report_diagnostics(wildcards):
    return [png for m in METHODS for s in SEEDS for png in pretrain_diagnostics(wildcards.name, m, s)]


def report_outputs():
    return [f"results/{NAME}/report/report.html", f"results/{NAME}/report/summary.csv"]


def tracking_hook(*args):
    """track-init / track-finish. Under on_error: continue they warn and exit 0; under fail they
    print one line (the URI and the ways out) and exit 2, and the pipeline stops with that line,
    not a dump of the command with the whole config in it."""
    if config["tracking"]["enabled"]:
        rc = subprocess.run(["python", "-m", "sslpipe", *args, "--config", json.dumps(config)]).returncode
        if rc:
            raise WorkflowError(f"sslpipe {args[0]} failed (exit {rc}); see the line above")


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
    print(f"\nEach job's own log: logs/{NAME}/<stage>/... (the failed ones are shown above).", file=sys.stderr)
