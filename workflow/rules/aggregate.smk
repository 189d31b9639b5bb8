# From every certify.json of the grid to summary.csv, then the tables and the figures. Cheap and
# file-bound: local rules (never sent to a cluster). aggregate also logs into MLflow whatever the
# train and certify jobs could not (a tracking server down or unreachable from the nodes); summary.csv,
# the tables and the figures go into the experiment's `summary` run.


rule aggregate:
    input:
        grid=GRID_FILE,
        runs=certify_files(),
    output:
        f"{RESULTS}/summary.csv",
    log:
        "logs/aggregate/aggregate.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        results=output_dir,
        experiment=EXPERIMENT,
    shell:
        # --track: runs whose jobs could not reach the tracker are logged now (cll.tracking.backfill)
        "cll aggregate --grid {input.grid:q} --results {params.results:q} --track {params.experiment:q}" " > {log} 2>&1"


rule tables:
    input:
        rules.aggregate.output,
    output:
        table_files(),
    log:
        "logs/tables/tables.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        out=output_dir,
        experiment=EXPERIMENT,
    shell:
        "cll tables --summary {input:q} --out {params.out:q} --track {params.experiment:q} > {log} 2>&1"


rule figures:
    input:
        rules.aggregate.output,
    output:
        report(
            directory(f"{RESULTS}/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    log:
        "logs/figures/figures.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        experiment=EXPERIMENT,
    shell:
        "cll figures --summary {input:q} --out {output:q} --track {params.experiment:q} > {log} 2>&1"
