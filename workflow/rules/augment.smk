rule augment:
    input:
        unpack(data_files),
    output:
        policy="results/{dataset}/augment/{method}/policy.json",
        preview=report(
            "results/{dataset}/augment/{method}/preview.png",
            caption="../report/preview.rst",
            category="Augmentation",
            labels={"method": "{method}"},
        ),
        benchmark="results/{dataset}/augment/{method}/benchmark.json",
    params:
        cfg=lambda w: stage_config("augment", w.method),
        data_dir=lambda w, input: os.path.dirname(input.manifest),
        out_dir=lambda w, output: os.path.dirname(output.policy),
        seed=SEEDS[0],
    log:
        "logs/{dataset}/augment/{method}.log",
    benchmark:
        "benchmarks/{dataset}/augment/{method}.tsv"
    threads: 1
    # Before the baselines: each augment job unlocks its method's pretraining, the long jobs.
    priority: 2
    shell:
        "python -m sslpipe augment --config {params.cfg:q} --threads {threads} --method {wildcards.method} "
        "--seed {params.seed} --data-dir {params.data_dir:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
