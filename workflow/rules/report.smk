# Figures, tables and the PDF report of each study: `snakemake reports/<study>.pdf` regenerates one.
# The report reads only its declared inputs: the study tables and the study-level array packs below.

localrules:
    aggregate_study,
    aggregate_arrays,
    counts,
    report,


rule aggregate_arrays:
    input:
        lambda wc: study_arrays(wc.study)[wc.array][2],
    output:
        f"{R}/studies/{{study}}/arrays/{{array}}.npz",
    params:
        runs=lambda wc: json.dumps(study_arrays(wc.study)[wc.array][3]),
        max_items=lambda wc: (
            f"--max-items {ARRAY_PREVIEW_ITEMS[study_arrays(wc.study)[wc.array][0].name]}"
            if study_arrays(wc.study)[wc.array][0].name in ARRAY_PREVIEW_ITEMS
            else ""
        ),
    wildcard_constraints:
        array=ARRAY_NAMES,  # the registry's per-run array files (diffbias.measurements)
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/aggregate/{{study}}/arrays_{{array}}.log",
    shell:
        "python -m diffbias aggregate-arrays --runs {params.runs:q} {params.max_items} --out {output} {input} > {log} 2>&1"


rule report:
    input:
        unpack(lambda wc: report_inputs(wc.study)),
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
