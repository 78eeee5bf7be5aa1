# The resume checkpoint lives outside results/ and is no declared output: Snakemake deletes a
# failed job's outputs, and a kill or SIGTERM (SLURM preemption) is a failure. The next run of
# this job resumes from it, and deletes it once the outputs are written (src/sslpipe/pretrain.py).
#
# A checkpoint, not a plain rule, for one reason: besides its declared outputs a job writes its
# method's diagnostics figures (CD, DAE), which the report reads and must declare, and Snakemake
# cannot declare outputs that only some methods write. After each job, the report's inputs are
# re-evaluated and list the figures found (common.smk pretrain_diagnostics).
checkpoint pretrain:
    input:
        unpack(data_files),
        policy="results/{name}/augment/{method}/policy.json",
    output:
        encoder="results/{name}/pretrain/{method}/seed{seed}/encoder.pt",
        history="results/{name}/pretrain/{method}/seed{seed}/history.csv",
        summary="results/{name}/pretrain/{method}/seed{seed}/summary.json",
    params:
        cfg=lambda w: stage_config("pretrain", w.method),
        data_dir=lambda w, input: os.path.dirname(input.manifest),
        out_dir=lambda w, output: os.path.dirname(output.encoder),
        checkpoint="checkpoints/{name}/{method}/seed{seed}/checkpoint.pt",
    log:
        "logs/{name}/pretrain/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{name}/pretrain/{method}/seed{seed}.tsv"
    # One thread per process: on the CPU, two 1-thread jobs side by side train ~15% more images
    # per CPU-second than one 2-thread job (the small CNN's ops are too small to split well), and
    # on a GPU the CPU threads hardly matter. Raise it with --set-threads pretrain=N.
    threads: PRETRAIN_PROCESSES
    # One GPU per process. Locally Snakemake counts it only against --resources gpu=N (so jobs
    # take turns on N GPUs); the SLURM executor turns it into --gpus.
    resources:
        gpu=PRETRAIN_PROCESSES * PRETRAIN_NODES,
        **PRETRAIN_NODE_RESOURCES,  # pretrain.nodes > 1: nodes, one task each (common.smk)
    priority: 1  # the long jobs start first; the baselines' short jobs fill the gaps
    conda:
        "../envs/sslpipe.yaml"
    shell:
        pretrain_command(PRETRAIN_PROCESSES)

