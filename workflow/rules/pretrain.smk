# The resume checkpoint lives outside results/ and is no declared output: Snakemake deletes a
# failed job's outputs, and a kill or SIGTERM (SLURM preemption) is a failure. The next run of
# this job resumes from it, and deletes it once the outputs are written (src/sslpipe/pretrain.py).
rule pretrain:
    input:
        unpack(data_files),
        policy="results/{dataset}/augment/{method}/policy.json",
    output:
        encoder="results/{dataset}/pretrain/{method}/seed{seed}/encoder.pt",
        history="results/{dataset}/pretrain/{method}/seed{seed}/history.csv",
        summary="results/{dataset}/pretrain/{method}/seed{seed}/summary.json",
    params:
        cfg=lambda w: stage_config("pretrain", w.method),
        data_dir=lambda w, input: os.path.dirname(input.manifest),
        out_dir=lambda w, output: os.path.dirname(output.encoder),
        checkpoint="checkpoints/{dataset}/{method}/seed{seed}/checkpoint.pt",
    log:
        "logs/{dataset}/pretrain/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/pretrain/{method}/seed{seed}.tsv"
    threads: 2
    shell:
        "python -m sslpipe pretrain --config {params.cfg:q} --threads {threads} --method {wildcards.method} "
        "--seed {wildcards.seed} --data-dir {params.data_dir:q} --policy {input.policy:q} "
        "--out-dir {params.out_dir:q} --checkpoint {params.checkpoint:q} > {log:q} 2>&1"
