rule augment:
    input:
        unpack(data_files),
    output:
        policy="results/{name}/augment/{method}/policy.json",
        preview=report(
            "results/{name}/augment/{method}/preview.png",
            caption="../report/preview.rst",
            category="Augmentation",
            labels={"method": "{method}"},
        ),
        benchmark="results/{name}/augment/{method}/benchmark.json",
    params:
        cfg=lambda w: stage_config("augment", w.method),
        data_dir=lambda w, input: os.path.dirname(input.manifest),
        out_dir=lambda w, output: os.path.dirname(output.policy),
        seed=SEEDS[0],
    log:
        "logs/{name}/augment/{method}.log",
    benchmark:
        "benchmarks/{name}/augment/{method}.tsv"
    threads: 1
    # Before the baselines: each augment job unlocks its method's pretraining, the long jobs.
    priority: 2
    conda:
        "../envs/sslpipe.yaml"
    shell:
        "python -m sslpipe augment --config {params.cfg:q} --threads {threads} --method {wildcards.method} "
        "--seed {params.seed} --data-dir {params.data_dir:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
