rule report:
    input:
        unpack(report_inputs),
    output:
        html=report(
            "results/{name}/report/report.html",
            caption="../report/report.rst",
            category="Report",
        ),
        markdown="results/{name}/report/report.md",
        summary=report(
            "results/{name}/report/summary.csv",
            caption="../report/summary.rst",
            category="Report",
        ),
    params:
        cfg=lambda w: stage_config("report"),
        results_dir=lambda w: f"results/{w.name}",
        out_dir=lambda w, output: os.path.dirname(output.html),
    log:
        "logs/{name}/report.log",
    benchmark:
        "benchmarks/{name}/report.tsv"
    threads: 1
    conda:
        "../envs/sslpipe.yaml"
    shell:
        "python -m sslpipe report --config {params.cfg:q} --threads {threads} "
        "--results-dir {params.results_dir:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
