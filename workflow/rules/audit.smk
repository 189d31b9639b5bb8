# One job per runnable cell: attack the certified points of a sample of its test set at the run's
# certify_eps (`cll audit`: PGD-l2 with restarts and APGD-l2, src/cll/attack.py) into audit.json.
# A certificate broken by the attack fails the job: exit status 1 and one line,
# "cll: error: BROKEN CERTIFICATE in <run>: ...", in the job's log; the tables then are not built.
#
# The sample and the attack budget (--n, --steps, --restarts) are the row's `audit` setting in the
# grid, by default cll.schema.AUDIT: 100 points, 30 steps, 2 restarts, small enough for the
# demo grid on a CPU (a few seconds per cell). A larger audit of one run by hand:
# cll audit --run DIR --n 5000.


rule audit:
    input:
        rules.train.output,  # train.json: the run finished (audit reads model.pt beside it)
    output:
        f"{RUN_DIR}/audit.json",
    log:
        f"logs/audit/{CELL_PATH}.log",
    conda:
        "../../envs/train.yaml"
    threads: threads_of
    resources:
        **resources_of("audit"),
    params:
        run=run_dir_of,
        budget=audit_args,
        experiment=EXPERIMENT,
        method=method_of,
    shell:
        "cll audit --run {params.run:q} {params.budget} --track {params.experiment:q} --method {params.method:q}"
        " > {log} 2>&1"


rule all_audits:
    input:
        audit_files(),
    localrule: True
