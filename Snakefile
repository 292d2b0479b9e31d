# diffbias: train every backbone/ablation of a study, measure it, and render the report.
#   snakemake --cores all                                   # the embedded default (config.yaml)
#   snakemake --cores all --configfile workflow/configs/paper-004.yaml --profile slurm
# Rules are thin: each calls `python -m diffbias <command>`; the library under src/diffbias does the work.
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        expand(f"{REPORTS}/{{study}}.pdf", study=STUDIES),
