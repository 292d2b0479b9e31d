# One training per (dataset, variant, N, seed), shared by every study that lists it.
# Resumable: checkpoints go to a side path Snakemake does not manage (it deletes declared outputs of
# failed jobs); a retry resumes from there. The trainer stops cleanly before the job's runtime.


rule train:
    input:
        data=f"{R}/data/{{dataset}}.npz",
    output:
        model=f"{RUN_DIR}/model.pt",
        log=f"{RUN_DIR}/train_log.parquet",
        run=f"{RUN_DIR}/run.json",
    params:
        spec=run_spec_json,
        checkpoint=lambda wc: CHECKPOINT.format(**wc),
        device=CFG["device"],
    threads: CFG["threads_per_job"]
    resources:
        runtime=lambda wc, attempt: resource("train", "runtime", 60) * attempt,
        mem_mb=resource("train", "mem_mb", 4000),
        gpu=resource("train", "gpu", 0),
    log:
        f"{LOGS}/train/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}.log",
    shell:
        "python -m diffbias train --spec {params.spec:q} --data {input.data} "
        "--out-dir $(dirname {output.model}) --checkpoint {params.checkpoint} "
        "--device {params.device} --threads {threads} --max-runtime-minutes {resources.runtime} "
        "2>&1 | tee {log}"
