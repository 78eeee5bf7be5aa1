rule prepare:
    output:
        train="results/{dataset}/data/train.npz",
        test="results/{dataset}/data/test.npz",
        manifest="results/{dataset}/data/manifest.json",
    params:
        cfg=lambda w: stage_config("prepare"),
        out_dir=lambda w, output: os.path.dirname(output.manifest),
    log:
        "logs/{dataset}/prepare.log",
    benchmark:
        "benchmarks/{dataset}/prepare.tsv"
    threads: 1
    shell:
        "python -m sslpipe prepare --config {params.cfg:q} --threads {threads} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"
