# Linear evaluation: features of the frozen encoder, extracted once per job and reused by the
# linear probes (all labels, then evaluate.label_fractions of them), kNN and the PCA picture.
# Features are not cached across jobs: each (name, seed) has exactly one evaluation job.
# The config slice comes from stage_slice (common.smk).


rule linear_eval:
    input:
        unpack(data_files),
        encoder="results/{name}/pretrain/{method}/seed{seed}/encoder.pt",
        summary="results/{name}/pretrain/{method}/seed{seed}/summary.json",
    output:
        metrics="results/{name}/linear_eval/{method}/seed{seed}/metrics.json",
        embedding="results/{name}/linear_eval/{method}/seed{seed}/embedding.png",
        # Per test image: right or wrong, per metric (the report's paired intervals need them).
        predictions="results/{name}/linear_eval/{method}/seed{seed}/predictions.npz",
    params:
        cfg=lambda w: stage_config("linear_eval"),
        data_dir=lambda w, input: os.path.dirname(input.manifest),
    log:
        "logs/{name}/linear_eval/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{name}/linear_eval/{method}/seed{seed}.tsv"
    threads: 1
    conda:
        "../envs/sslpipe.yaml"
    shell:
        "python -m sslpipe linear-eval --config {params.cfg:q} --threads {threads} --method {wildcards.method} "
        "--seed {wildcards.seed} --data-dir {params.data_dir:q} --encoder {input.encoder:q} --summary {input.summary:q} "
        "--out {output.metrics:q} --embedding {output.embedding:q} --predictions {output.predictions:q} > {log:q} 2>&1"


# Baselines on the same protocol, so the report shows whether pretraining helped: a linear
# probe on raw pixels and on the randomly initialised encoder (lower references), and on the
# same encoder trained with labels (supervised, the upper reference; it trains here, by the
# pretraining loop, and resumes from its checkpoint after SIGTERM as pretraining does; the
# other baselines ignore --checkpoint).
rule baseline:
    input:
        unpack(data_files),
    output:
        metrics="results/{name}/linear_eval/{baseline}/seed{seed}/metrics.json",
        embedding="results/{name}/linear_eval/{baseline}/seed{seed}/embedding.png",
        predictions="results/{name}/linear_eval/{baseline}/seed{seed}/predictions.npz",
    params:
        cfg=lambda w: stage_config("linear_eval", baseline=w.baseline),
        data_dir=lambda w, input: os.path.dirname(input.manifest),
        checkpoint="checkpoints/{name}/{baseline}/seed{seed}/checkpoint.pt",
    log:
        "logs/{name}/linear_eval/{baseline}/seed{seed}.log",
    benchmark:
        "benchmarks/{name}/linear_eval/{baseline}/seed{seed}.tsv"
    threads: 1
    conda:
        "../envs/sslpipe.yaml"
    shell:
        "python -m sslpipe linear-eval --config {params.cfg:q} --threads {threads} --method {wildcards.baseline} "
        "--seed {wildcards.seed} --data-dir {params.data_dir:q} --out {output.metrics:q} --embedding {output.embedding:q} "
        "--predictions {output.predictions:q} --checkpoint {params.checkpoint:q} > {log:q} 2>&1"
