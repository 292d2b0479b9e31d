# Per-run measurements, then one tidy parquet per study.


rule psnr_gap:
    input:
        model=f"{RUN_DIR}/model.pt",
        data=f"{R}/data/{{dataset}}.npz",
    output:
        f"{RUN_DIR}/psnr.parquet",
    params:
        cfg=settings_json("evaluation", "psnr"),
        device=CFG["device"],
    group: "eval_{dataset}_{variant}_N{n}_seed{seed}"  # one SLURM job per run's evaluations (slurm/config.yaml)
    threads: CFG["threads_per_job"]
    resources:
        runtime=resource("evaluate", "runtime", 30),
        mem_mb=resource("evaluate", "mem_mb", 4000),
        gpu=resource("evaluate", "gpu", 0),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/psnr/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}.log",
    shell:
        "python -m diffbias psnr --model {input.model} --data {input.data} --out {output} --config {params.cfg:q} "
        "--device {params.device} --threads {threads} > {log} 2>&1"


FID_CFG = settings_json("evaluation", "fid")


# The reference set depends only on (dataset, N, seed): its Inception features are computed once here and
# shared by every variant's FID and FID-curve jobs.
rule fid_reference:
    input:
        data=f"{R}/data/{{dataset}}.npz",
    output:
        FID_REFERENCE,
    params:
        fid=FID_CFG,
        test_size=lambda wc: CFG["datasets"][wc.dataset]["test_size"],
        device=CFG["device"],
    threads: CFG["threads_per_job"]
    resources:
        runtime=resource("evaluate", "runtime", 30),
        mem_mb=resource("evaluate", "mem_mb", 4000),
        gpu=resource("evaluate", "gpu", 0),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/fid_reference/{{dataset}}/N{{n}}/seed{{seed}}.log",
    shell:
        "python -m diffbias fid-reference --data {input.data} --out {output} --n {wildcards.n} --seed {wildcards.seed} "
        "--test-size {params.test_size} --config {params.fid:q} --device {params.device} --threads {threads} > {log} 2>&1"


rule fid:
    input:
        model=f"{RUN_DIR}/model.pt",
        data=f"{R}/data/{{dataset}}.npz",
        reference=FID_REFERENCE,
    output:
        table=f"{RUN_DIR}/fid.parquet",
        samples=f"{RUN_DIR}/samples.npz",
    params:
        fid=FID_CFG,
        device=CFG["device"],
    group: "eval_{dataset}_{variant}_N{n}_seed{seed}"  # one SLURM job per run's evaluations (slurm/config.yaml)
    threads: CFG["threads_per_job"]
    resources:
        runtime=resource("evaluate", "runtime", 30),
        mem_mb=resource("evaluate", "mem_mb", 4000),
        gpu=resource("evaluate", "gpu", 0),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/fid/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}.log",
    shell:
        "python -m diffbias fid --model {input.model} --data {input.data} --out {output.table} "
        "--samples-out {output.samples} --config {params.fid:q} --reference-features {input.reference} "
        "--device {params.device} --threads {threads} > {log} 2>&1"


rule fid_curve:
    input:
        unpack(fid_curve_inputs),
    output:
        f"{RUN_DIR}/fid_curve.parquet",
    params:
        fid=FID_CFG,
        device=CFG["device"],
        final_fid=lambda wc, input: f"--final-fid {input.final_fid}" if "final_fid" in input.keys() else "",
    group: "eval_{dataset}_{variant}_N{n}_seed{seed}"  # one SLURM job per run's evaluations (slurm/config.yaml)
    threads: CFG["threads_per_job"]
    resources:
        # one FID per snapshot plus the final model
        runtime=lambda wc: resource("evaluate", "runtime", 30) * (1 + len(run_spec(CFG, run_key(wc))["training"]["snapshot_steps"])),
        mem_mb=resource("evaluate", "mem_mb", 4000),
        gpu=resource("evaluate", "gpu", 0),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/fid_curve/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}.log",
    shell:
        "python -m diffbias fid-curve --model {input.model} --snapshots {input.snapshots} --data {input.data} "
        "--out {output} --config {params.fid:q} --reference-features {input.reference} {params.final_fid} "
        "--device {params.device} --threads {threads} > {log} 2>&1"


rule gmm_masks:
    input:
        f"{RUN_DIR}/model.pt",
    output:
        table=f"{RUN_DIR}/gmm_masks.parquet",
        maps=f"{RUN_DIR}/gmm_masks.npz",
    group: "eval_{dataset}_{variant}_N{n}_seed{seed}"  # one SLURM job per run's evaluations (slurm/config.yaml)
    threads: 1
    resources:
        runtime=resource("evaluate", "runtime", 30),
        mem_mb=resource("evaluate", "mem_mb", 4000),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/gmm_masks/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}.log",
    shell:
        "python -m diffbias gmm-masks --model {input} --out {output.table} --maps-out {output.maps} "
        "--threads {threads} > {log} 2>&1"




rule jacobian:
    input:
        model=f"{RUN_DIR}/model.pt",
        data=f"{R}/data/{{dataset}}.npz",
    output:
        table=f"{RUN_DIR}/jacobian.parquet",
        vectors=f"{RUN_DIR}/jacobian_vectors.npz",
    params:
        cfg=settings_json("evaluation", "jacobian"),
        device=CFG["device"],
    group: "eval_{dataset}_{variant}_N{n}_seed{seed}"  # one SLURM job per run's evaluations (slurm/config.yaml)
    threads: CFG["threads_per_job"]
    resources:
        runtime=resource("evaluate", "runtime", 30),
        mem_mb=resource("evaluate", "mem_mb", 4000),
        gpu=resource("evaluate", "gpu", 0),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/jacobian/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}.log",
    shell:
        "python -m diffbias jacobian --model {input.model} --data {input.data} --out {output.table} "
        "--vectors-out {output.vectors} --config {params.cfg:q} --device {params.device} --threads {threads} > {log} 2>&1"


rule attention:
    input:
        model=f"{RUN_DIR}/model.pt",
        data=f"{R}/data/{{dataset}}.npz",
    output:
        table=f"{RUN_DIR}/attention.parquet",
        maps=f"{RUN_DIR}/attention_maps.npz",
    params:
        cfg=settings_json("evaluation", "attention"),
        device=CFG["device"],
    group: "eval_{dataset}_{variant}_N{n}_seed{seed}"  # one SLURM job per run's evaluations (slurm/config.yaml)
    threads: CFG["threads_per_job"]
    resources:
        runtime=resource("evaluate", "runtime", 30),
        mem_mb=resource("evaluate", "mem_mb", 4000),
        gpu=resource("evaluate", "gpu", 0),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/attention/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}.log",
    shell:
        "python -m diffbias attention --model {input.model} --data {input.data} --out {output.table} "
        "--maps-out {output.maps} --config {params.cfg:q} --device {params.device} --threads {threads} > {log} 2>&1"


rule freeu_grid:
    input:
        model=f"{RUN_DIR}/model.pt",
        data=f"{R}/data/{{dataset}}.npz",
    output:
        table=f"{RUN_DIR}/{FREEU.outputs[0]}",  # freeu-{study}.parquet (diffbias.measurements)
        samples=f"{RUN_DIR}/{FREEU.outputs[1]}",
    params:
        cfg=lambda wc: settings_json("studies", wc.study, FREEU.study_key),
        device=CFG["device"],
    group: "eval_{dataset}_{variant}_N{n}_seed{seed}"  # one SLURM job per run's evaluations (slurm/config.yaml)
    threads: CFG["threads_per_job"]
    resources:
        runtime=resource("evaluate", "runtime", 30),
        mem_mb=resource("evaluate", "mem_mb", 4000),
        gpu=resource("evaluate", "gpu", 0),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/freeu/{{study}}/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}.log",
    shell:
        "python -m diffbias freeu-grid --model {input.model} --data {input.data} --out {output.table} "
        "--samples-out {output.samples} --config {params.cfg:q} --device {params.device} --threads {threads} > {log} 2>&1"


# A registered plugin measurement (diffbias.measurements, docs/adding-a-measurement.md): its resolved config
# section goes to `python -m diffbias measure` as JSON.
rule measure:
    input:
        model=f"{RUN_DIR}/model.pt",
        data=f"{R}/data/{{dataset}}.npz",
    output:
        f"{RUN_DIR}/{{measurement}}.parquet",
    params:
        cfg=lambda wc: json.dumps(CFG["evaluation"].get(PLUGINS[wc.measurement].config_key or "", {}), sort_keys=True),
        device=CFG["device"],
    wildcard_constraints:
        measurement=PLUGIN_NAMES,
    group: "eval_{dataset}_{variant}_N{n}_seed{seed}"  # one SLURM job per run's evaluations (slurm/config.yaml)
    threads: CFG["threads_per_job"]
    resources:
        runtime=resource("evaluate", "runtime", 30),
        mem_mb=resource("evaluate", "mem_mb", 4000),
        gpu=resource("evaluate", "gpu", 0),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/{{measurement}}/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}.log",
    shell:
        "python -m diffbias measure {wildcards.measurement} --model {input.model} --data {input.data} --out {output} "
        "--config {params.cfg:q} --device {params.device} --threads {threads} > {log} 2>&1"


rule aggregate_study:
    input:
        aggregate_inputs,
    output:
        f"{R}/studies/{{study}}/{{table}}.parquet",
    params:
        study=study_json,
    wildcard_constraints:
        table=AGGREGATED_TABLES,  # the registry's measurements (diffbias.measurements) and the training log
    conda:
        "../envs/diffbias.yaml"
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
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/counts/{{study}}.log",
    shell:
        "python -m diffbias counts --study {params.study:q} --out {output.counts} --ops-out {output.ops} > {log} 2>&1"
