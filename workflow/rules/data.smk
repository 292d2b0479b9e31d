# Preprocessed arrays, cached once per data set entry (source, resolution, channels) and shared by all runs.
from diffbias.latents import cache_spec


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
# streamed, cropped as ADM does, written as float16 .npy shards. Training and measurement jobs of such a data set
# read this cache instead of a prepared pool (diffbias.plan.data_input). The declared output is meta.json alone,
# written last: Snakemake deletes a job's declared outputs before it runs, so the shards beside it survive a
# killed or failed job and the re-run resumes from them.
rule encode_latents:
    input:
        unpack(lambda wc: plan.encode_inputs(CFG, wc.dataset)),
    output:
        plan.pattern("latents", R),
    params:
        # the keys that decide the latents (no split, test_size, pool_size: editing them re-encodes nothing)
        spec=lambda wc: json.dumps(cache_spec(CFG["datasets"][wc.dataset]), sort_keys=True),
        out=lambda wc: f"{R}/latents/{wc.dataset}",
        device=CFG["device"],
    threads: CFG["threads_per_job"]
    resources:
        runtime=lambda wc, attempt: resource("encode_latents", "runtime", 240) * attempt,
        mem_mb=resource("encode_latents", "mem_mb", 16000),
        gpu=resource("encode_latents", "gpu", 0),
        gpu_slot=min(1, resource("encode_latents", "gpu", 0)),  # slurm/config.yaml: one GPU user at a time
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/encode_latents/{{dataset}}.log",
    shell:
        "python -m diffbias encode-latents --spec {params.spec:q} --out {params.out} --device {params.device} "
        "--threads {threads} --workers {threads} > {log} 2>&1"


# A seeded AutoencoderKL with SD's architecture and 2,067 parameters (diffbias.autoencoder.save_tiny_autoencoder),
# made here rather than downloaded: the rehearsal's latent data sets encode and decode through it.
localrules:
    tiny_autoencoder,


rule tiny_autoencoder:
    output:
        directory(plan.tiny_autoencoder(CFG)),
    log:
        f"{LOGS}/tiny_autoencoder.log",
    conda:
        "../envs/diffbias.yaml"
    shell:
        "python -m diffbias tiny-autoencoder --out {output} > {log} 2>&1"
