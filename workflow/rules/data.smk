rule prepare:
    output:
        train="results/{name}/data/train.npz",
        test="results/{name}/data/test.npz",
        manifest="results/{name}/data/manifest.json",
    params:
        cfg=lambda w: stage_config("prepare"),
        out_dir=lambda w, output: os.path.dirname(output.manifest),
    log:
        "logs/{name}/prepare.log",
    benchmark:
        "benchmarks/{name}/prepare.tsv"
    threads: 1
    conda:
        "../envs/sslpipe.yaml"
    shell:
        "python -m sslpipe prepare --config {params.cfg:q} --threads {threads} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"
