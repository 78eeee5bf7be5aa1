rule linear_eval:
    input:
        unpack(data_files),
        encoder="results/{dataset}/pretrain/{method}/seed{seed}/encoder.pt",
        summary="results/{dataset}/pretrain/{method}/seed{seed}/summary.json",
    output:
        metrics="results/{dataset}/linear_eval/{method}/seed{seed}/metrics.json",
    params:
        cfg=lambda w: stage_config("linear_eval"),
        data_dir=lambda w, input: os.path.dirname(input.manifest),
    log:
        "logs/{dataset}/linear_eval/{method}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/linear_eval/{method}/seed{seed}.tsv"
    threads: 1
    shell:
        "python -m sslpipe linear-eval --config {params.cfg:q} --threads {threads} --method {wildcards.method} "
        "--seed {wildcards.seed} --data-dir {params.data_dir:q} --encoder {input.encoder:q} "
        "--out {output.metrics:q} > {log:q} 2>&1"


# Baselines on the same protocol, so the report shows whether pretraining helped: a linear
# probe on raw pixels and on the randomly initialised encoder.
rule baseline:
    input:
        unpack(data_files),
    output:
        metrics="results/{dataset}/linear_eval/{baseline}/seed{seed}/metrics.json",
    params:
        cfg=lambda w: stage_config("linear_eval"),
        data_dir=lambda w, input: os.path.dirname(input.manifest),
    log:
        "logs/{dataset}/linear_eval/{baseline}/seed{seed}.log",
    benchmark:
        "benchmarks/{dataset}/linear_eval/{baseline}/seed{seed}.tsv"
    threads: 1
    shell:
        "python -m sslpipe linear-eval --config {params.cfg:q} --threads {threads} --method {wildcards.baseline} "
        "--seed {wildcards.seed} --data-dir {params.data_dir:q} --out {output.metrics:q} > {log:q} 2>&1"
