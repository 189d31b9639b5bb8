# The cll workflow: one train, one certify and one audit job per runnable cell of a grid, then summary.csv,
# the tables and the figures. Every job is one `cll ...` command (printed with -p; paste it to rerun).
#
#   snakemake --cores 2 all_tables                                   # the embedded demo (make demo)
#   snakemake all_tables --configfile config/paper.yaml --profile profiles/slurm
#   snakemake --report report.html                                   # after a run
#
# Targets come before --configfile (it takes several files). Override grids with --configfile, not
# --config (lists given there reach the schema as strings). See workflow/rules/common.smk.
from snakemake.logging import logger
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/certify.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/audit.smk"


# Say where each job's progress goes (its log file); MLflow: create the store and the experiment
# once, before parallel jobs race to do it (sqlite store creation is not safe under concurrency).
# Runs in the main process only, not in dry runs.
onstart:
    logger.info(cll_workflow.progress_note())
    shell(cll_workflow.track_init_command(EXPERIMENT))


rule all_tables:
    default_target: True
    input:
        rules.tables.output,
        rules.figures.output,
        rules.all_audits.input,  # every cell's audit.json: a broken certificate fails the target
    localrule: True
