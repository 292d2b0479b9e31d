# Preprocessed arrays, cached once per data set entry (source, resolution, channels) and shared by all runs.


rule prepare_data:
    output:
        DATA,
    params:
        spec=lambda wc: as_json(CFG["datasets"][wc.dataset]),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/prepare_data/{{dataset}}.log",
    shell:
        "python -m diffbias prepare-data --spec {params.spec:q} --out {output} > {log} 2>&1"
