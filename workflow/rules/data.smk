# Preprocessed arrays, cached once per data set entry (source, resolution, channels) and shared by all runs.


rule prepare_data:
    output:
        DATA,
    params:
        spec=lambda wc: as_json(plan.data_spec(CFG, wc.dataset)),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/prepare_data/{{dataset}}.log",
    shell:
        "python -m diffbias prepare-data --spec {params.spec:q} --out {output} > {log} 2>&1"


# Autoencoder latents of a data set with a `latents:` section (docs/latents-and-multi-gpu.md), encoded once:
# streamed, cropped as ADM does, written as float16 .npy shards. Not an input of any rule yet (training on
# latents is wired in with the measurements). The declared output is meta.json alone, written last: Snakemake
# deletes a job's declared outputs before it runs, so the shards beside it survive a killed or failed job
# and the re-run resumes from them.
rule encode_latents:
    output:
        f"{R}/latents/{{dataset}}/meta.json",
    params:
        spec=lambda wc: json.dumps(plan.data_spec(CFG, wc.dataset), sort_keys=True),
        out=lambda wc: f"{R}/latents/{wc.dataset}",
        device=CFG["device"],
    threads: CFG["threads_per_job"]
    resources:
        runtime=lambda wc, attempt: resource("encode_latents", "runtime", 240) * attempt,
        mem_mb=resource("encode_latents", "mem_mb", 16000),
        gpu=resource("encode_latents", "gpu", 0),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/encode_latents/{{dataset}}.log",
    shell:
        "python -m diffbias encode-latents --spec {params.spec:q} --out {params.out} --device {params.device} "
        "--threads {threads} --workers {threads} > {log} 2>&1"
