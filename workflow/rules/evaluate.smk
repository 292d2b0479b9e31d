# Per-run measurements, then one tidy parquet per study.


rule psnr_gap:
    input:
        model=f"{RUN_DIR}/model.pt",
        data=f"{R}/data/{{dataset}}.npz",
    output:
        f"{RUN_DIR}/psnr.parquet",
    params:
        k=CFG["evaluation"]["psnr"]["num_images"],
        respacing=CFG["evaluation"]["psnr"]["respacing"],
        noise_seed=CFG["evaluation"]["psnr"]["noise_seed"],
        batch_size=CFG["evaluation"]["psnr"]["batch_size"],
        device=CFG["device"],
    threads: CFG["threads_per_job"]
    resources:
        runtime=resource("evaluate", "runtime", 30),
        mem_mb=resource("evaluate", "mem_mb", 4000),
        gpu=resource("evaluate", "gpu", 0),
    log:
        f"{LOGS}/psnr/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}.log",
    shell:
        "python -m diffbias psnr --model {input.model} --data {input.data} --out {output} "
        "--num-images {params.k} --respacing {params.respacing} --noise-seed {params.noise_seed} "
        "--batch-size {params.batch_size} --device {params.device} --threads {threads} > {log} 2>&1"


FID_CFG = CFG["evaluation"]["fid"]


rule fid:
    input:
        model=f"{RUN_DIR}/model.pt",
        data=f"{R}/data/{{dataset}}.npz",
    output:
        table=f"{RUN_DIR}/fid.parquet",
        samples=f"{RUN_DIR}/samples.npz",
    params:
        fid=FID_CFG,
        device=CFG["device"],
    threads: CFG["threads_per_job"]
    resources:
        runtime=resource("evaluate", "runtime", 30),
        mem_mb=resource("evaluate", "mem_mb", 4000),
        gpu=resource("evaluate", "gpu", 0),
    log:
        f"{LOGS}/fid/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}.log",
    shell:
        "python -m diffbias fid --model {input.model} --data {input.data} --out {output.table} "
        "--samples-out {output.samples} --num-samples {params.fid[num_samples]} --steps {params.fid[steps]} "
        "--reference {params.fid[reference]} --max-reference {params.fid[max_reference]} "
        "--sample-seed {params.fid[sample_seed]} --batch-size {params.fid[batch_size]} "
        "--device {params.device} --threads {threads} > {log} 2>&1"


rule aggregate_study:
    input:
        lambda wc: run_files(wc.study, f"{wc.table}.parquet"),
    output:
        f"{R}/studies/{{study}}/{{table}}.parquet",
    params:
        study=study_json,
    wildcard_constraints:
        table="psnr|train_log|fid",
    log:
        f"{LOGS}/aggregate/{{study}}/{{table}}.log",
    shell:
        "python -m diffbias aggregate --study {params.study:q} --out {output} {input} > {log} 2>&1"


rule counts:
    output:
        counts=f"{R}/studies/{{study}}/counts.parquet",
        ops=f"{R}/studies/{{study}}/counts_by_operator.parquet",
    params:
        study=study_json,
    log:
        f"{LOGS}/counts/{{study}}.log",
    shell:
        "python -m diffbias counts --study {params.study:q} --out {output.counts} --ops-out {output.ops} > {log} 2>&1"
