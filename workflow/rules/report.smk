rule report:
    input:
        unpack(report_inputs),
    output:
        html=report(
            "results/{dataset}/report/report.html",
            caption="../report/report.rst",
            category="Report",
        ),
        markdown="results/{dataset}/report/report.md",
        summary=report(
            "results/{dataset}/report/summary.csv",
            caption="../report/summary.rst",
            category="Report",
        ),
    params:
        cfg=lambda w: stage_config("report"),
        results_dir=lambda w: f"results/{w.dataset}",
        out_dir=lambda w, output: os.path.dirname(output.html),
    log:
        "logs/{dataset}/report.log",
    benchmark:
        "benchmarks/{dataset}/report.tsv"
    threads: 1
    shell:
        "python -m sslpipe report --config {params.cfg:q} --threads {threads} "
        "--results-dir {params.results_dir:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
