# Every measurement of the registry (diffbias.measurements), built-in or plugin, through one rule: one job per
# (run, measurement), so that changing one measurement's settings reruns only that measurement. The files a
# measurement needs besides its run's model and data (EMA snapshots, a shared input, another measurement's table)
# come from diffbias.plan.measurement_inputs.

TABLE_ONLY = alternatives(n for n, i in INSTANCES.items() if not i.measurement.arrays)
WITH_ARRAYS = alternatives(n for n, i in INSTANCES.items() if i.measurement.arrays)


rule measure:
    input:
        unpack(lambda wc: plan.measurement_inputs(CFG, wc.measurement, run_key(wc))),
    output:
        table=f"{RUN_DIR}/{{measurement}}.parquet",
    params:
        name=lambda wc: INSTANCES[wc.measurement].measurement.name,
        cfg=lambda wc: as_json(plan.instance_settings(CFG, wc.measurement)),
        inputs=lambda wc, input: " ".join(f"--input {arg}" for arg in plan.extra_inputs(dict(input.items()))),
        arrays=lambda wc, output: f"--arrays-out {output.arrays}" if "arrays" in output.keys() else "",
        device=CFG["device"],
    wildcard_constraints:
        measurement=TABLE_ONLY,
    group: "eval_{dataset}_{variant}_N{n}_seed{seed}"  # one SLURM job per run's evaluations (slurm/config.yaml)
    threads: CFG["threads_per_job"]
    resources:
        runtime=lambda wc: plan.runtime_minutes(CFG, wc.measurement, run_key(wc)),
        mem_mb=resource("evaluate", "mem_mb", 4000),
        gpu=resource("evaluate", "gpu", 0),
        gpu_slot=min(1, resource("evaluate", "gpu", 0)),  # slurm/config.yaml: a group's GPU members one at a time
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/measure/{{measurement}}/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}.log",
    shell:
        "python -m diffbias measure {params.name} --model {input.model} --data {input.data} --out {output.table} "
        "{params.arrays} --config {params.cfg:q} {params.inputs} --device {params.device} --threads {threads} "
        "> {log} 2>&1"


use rule measure as measure_with_arrays with:
    output:
        table=f"{RUN_DIR}/{{measurement}}.parquet",
        arrays=f"{RUN_DIR}/{{measurement}}.npz",
    wildcard_constraints:
        measurement=WITH_ARRAYS,


# A file several measurements read, built once per (dataset, N, seed, training part), e.g. the FID reference set's
# features; {part} is empty for split A and "_splitB" for split-B runs (plan.PATTERNS).
rule shared_input:
    input:
        unpack(lambda wc: {"data": plan.data_input(CFG, wc.dataset)}),
    output:
        plan.pattern("shared", R),
    params:
        cfg=lambda wc: as_json(plan.shared_settings(CFG, wc.shared)),
        test_size=lambda wc: CFG["datasets"][wc.dataset]["test_size"],
        split=lambda wc: plan.dataset_split(CFG, wc.dataset),
        part=lambda wc: plan.split_from_suffix(wc.part),
        device=CFG["device"],
    wildcard_constraints:
        shared=alternatives(measurements.SHARED_INPUTS),
        part=plan.SPLIT_WILDCARD,
    threads: CFG["threads_per_job"]
    resources:
        runtime=resource("evaluate", "runtime", 30),
        mem_mb=resource("evaluate", "mem_mb", 4000),
        gpu=resource("evaluate", "gpu", 0),
        gpu_slot=min(1, resource("evaluate", "gpu", 0)),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/shared/{{shared}}/{{dataset}}/N{{n}}/seed{{seed}}{{part}}.log",
    shell:
        "python -m diffbias shared-input {wildcards.shared} --data {input.data} --n {wildcards.n} "
        "--seed {wildcards.seed} --test-size {params.test_size} --split {params.split} --part {params.part} --config {params.cfg:q} --out {output} "
        "--device {params.device} --threads {threads} > {log} 2>&1"


rule aggregate_study:
    input:
        lambda wc: plan.table_inputs(CFG, wc.study, wc.table),
    output:
        plan.pattern("study_table", R),
    params:
        study=study_json,
    wildcard_constraints:
        table=alternatives(["train_log", *measurements.MEASUREMENTS]),
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/aggregate/{{study}}/{{table}}.log",
    shell:
        "python -m diffbias aggregate --study {params.study:q} --out {output} {input} > {log} 2>&1"


rule counts:
    output:
        counts=plan.pattern("study_table", R).replace("{table}", "counts"),
        ops=plan.pattern("study_table", R).replace("{table}", "counts_by_operator"),
        lengths=plan.pattern("study_table", R).replace("{table}", "counts_by_length"),
    params:
        study=study_json,
    conda:
        "../envs/diffbias.yaml"
    log:
        f"{LOGS}/counts/{{study}}.log",
    shell:
        "python -m diffbias counts --study {params.study:q} --out {output.counts} --ops-out {output.ops} "
        "--length-out {output.lengths} > {log} 2>&1"
