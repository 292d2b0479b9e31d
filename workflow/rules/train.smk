# One training per (dataset, variant, N, seed), shared by every study that lists it.
# Resumable: checkpoints go to a side path Snakemake does not manage (it deletes declared outputs of
# failed jobs); a retry resumes from there. The trainer stops cleanly before the job's runtime.
from diffbias.distributed import gpus_per_run, train_gpus, train_launcher


rule pca_basis:
    input:
        model=f"{RUN_DIR}/model.pt",
        data=lambda wc: plan.data_input(CFG, wc.dataset),
    output:
        f"{RUN_DIR}/pca_basis.pt",
    params:
        request=lambda wc: as_json(plan.pca_request(CFG, run_key(wc))),
        device=CFG["device"],
    group: "eval_{dataset}_{variant}_N{n}_seed{seed}"  # with the run's other evaluations (evaluate.smk)
    threads: CFG["threads_per_job"]
    resources:
        runtime=resource("evaluate", "runtime", 30),
        mem_mb=resource("evaluate", "mem_mb", 4000),
        gpu=resource("evaluate", "gpu", 0),
        gpu_slot=min(1, resource("evaluate", "gpu", 0)),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/pca_basis/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}.log",
    shell:
        "python -m diffbias pca-basis --model {input.model} --data {input.data} --out {output} "
        "--spec {params.request:q} --device {params.device} --threads {threads} > {log} 2>&1"


rule train:
    input:
        unpack(lambda wc: plan.train_inputs(CFG, run_key(wc))),
    output:
        model=f"{RUN_DIR}/model.pt",
        log=f"{RUN_DIR}/train_log.parquet",
        run=f"{RUN_DIR}/run.json",
        snapshots=directory(f"{RUN_DIR}/ema_snapshots"),
    params:
        spec=lambda wc: as_json(run_spec(CFG, run_key(wc))),
        checkpoint=lambda wc: plan.pattern("checkpoint", R).format(**wc),
        device=CFG["device"],
        pca_arg=lambda wc, input: f"--pca-basis {input.pca_basis}" if "pca_basis" in input.keys() else "",
        # torchrun with one process per GPU when training.gpus_per_run > 1 (diffbias.distributed), else python
        launcher=lambda wc: train_launcher(run_spec(CFG, run_key(wc))),
    group: lambda wc: plan.train_group(CFG, run_key(wc))
    threads: CFG["threads_per_job"]
    resources:
        runtime=lambda wc, attempt: resource("train", "runtime", 60) * attempt,
        mem_mb=resource("train", "mem_mb", 4000),
        # gpus_per_run GPUs (sbatch --gpus=N) on one node (--nodes=1; such a training is never grouped, plan.train_group)
        gpu=lambda wc: train_gpus(run_spec(CFG, run_key(wc)), resource("train", "gpu", 0)),
        gpu_slot=lambda wc: min(1, train_gpus(run_spec(CFG, run_key(wc)), resource("train", "gpu", 0))),
        nodes=lambda wc: 1 if gpus_per_run(run_spec(CFG, run_key(wc))) > 1 else None,
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/train/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}.log",
    shell:
        "{params.launcher} train --spec {params.spec:q} --data {input.data} "
        "--out-dir $(dirname {output.model}) --checkpoint {params.checkpoint} "
        "--device {params.device} --threads {threads} --max-runtime-minutes {resources.runtime} "
        "{params.pca_arg} "
        "2>&1 | tee {log}"
