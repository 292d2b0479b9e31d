# Figures, tables and the PDF report of each study: `snakemake reports/<study>.pdf` regenerates one.
# The report reads only its declared inputs: the study tables and the study-level array packs below.

localrules:
    aggregate_study,
    aggregate_arrays,
    counts,
    report,


rule aggregate_arrays:
    input:
        lambda wc: plan.study_arrays(CFG, wc.study)[wc.measurement].files,
    output:
        plan.pattern("study_arrays", R),
    params:
        runs=lambda wc: as_json(list(plan.study_arrays(CFG, wc.study)[wc.measurement].runs)),
        preview=lambda wc: (f"--max-items {items}" if (items := plan.study_arrays(CFG, wc.study)[wc.measurement]
                                                        .preview_items) else ""),
    wildcard_constraints:
        measurement=alternatives(n for n, m in measurements.MEASUREMENTS.items() if m.arrays),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/aggregate/{{study}}/arrays_{{measurement}}.log",
    shell:
        "python -m diffbias aggregate-arrays --runs {params.runs:q} {params.preview} --out {output} {input} > {log} 2>&1"


rule report:
    input:
        unpack(lambda wc: plan.report_inputs(CFG, wc.study)),
    output:
        pdf=report(f"{REPORTS}/{{study}}.pdf", caption="../report/study.rst", category="Reports"),
        figures=directory(f"{R}/studies/{{study}}/figures"),
        tables=directory(f"{R}/studies/{{study}}/tables"),
    params:
        study=study_json,
        study_dir=lambda wc: f"{R}/studies/{wc.study}",
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/report/{{study}}.log",
    shell:
        "python -m diffbias report --study {params.study:q} --study-dir {params.study_dir} --out {output.pdf} > {log} 2>&1"
