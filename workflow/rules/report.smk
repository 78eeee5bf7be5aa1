rule report:
    input:
        unpack(report_inputs),
        diagnostics=report_diagnostics,
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
        # The declared inputs again, keyed (common.smk report_files): the report reads only these.
        inputs=lambda w: json.dumps(report_files(w.name)),
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
        "--inputs {params.inputs:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
