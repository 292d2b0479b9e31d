# Figures, tables and the PDF report of each study: `snakemake reports/<study>.pdf` regenerates one.

localrules:
    aggregate_study,
    counts,
    report,


rule report:
    input:
        unpack(lambda wc: study_tables(wc.study)),
    output:
        pdf=report(f"{REPORTS}/{{study}}.pdf", caption="../report/study.rst", category="Reports"),
    params:
        study=study_json,
        study_dir=lambda wc: f"{R}/studies/{wc.study}",
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/report/{{study}}.log",
    shell:
        "python -m diffbias report --study {params.study:q} --study-dir {params.study_dir} --out {output.pdf} > {log} 2>&1"
