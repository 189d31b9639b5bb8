# One job per runnable cell: attack the certified points of a sample of its test set at the run's
# certify_eps (`cll audit`: PGD-l2 with restarts and APGD-l2, src/cll/attack.py) into audit.json.
# A certificate broken by the attack fails the job: exit status 1 and one line,
# "cll: error: BROKEN CERTIFICATE in <run>: ...", in the job's log; the tables then are not built.
#
# The sample and the attack budget are set here, small enough for the demo grid on a CPU
# (a few seconds per cell). A larger audit of one run by hand: cll audit --run DIR --n 5000.
AUDIT_SAMPLES = 100  # test points per cell (the whole test set where it is smaller)
AUDIT_STEPS = 30  # iterations per attack
AUDIT_RESTARTS = 2  # PGD restarts (APGD-DLR and APGD-CE run once each)


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
        n=AUDIT_SAMPLES,
        steps=AUDIT_STEPS,
        restarts=AUDIT_RESTARTS,
    shell:
        "cll audit --run {params.run:q} --n {params.n} --steps {params.steps} --restarts {params.restarts}"
        " > {log} 2>&1"


rule all_audits:
    input:
        audit_files(),
    localrule: True
