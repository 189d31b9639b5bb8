# From every certify.json of the grid to summary.csv, then the tables and the figures. Cheap and
# file-bound: local rules (never sent to a cluster).


rule aggregate:
    input:
        grid=GRID_FILE,
        runs=certify_files(),
    output:
        f"{RESULTS}/summary.csv",
    log:
        "logs/aggregate/aggregate.log",
    params:
        results=output_dir,
    localrule: True
    conda:
        "../../envs/report.yaml"
    shell:
        "cll aggregate --grid {input.grid:q} --results {params.results:q} > {log} 2>&1"


rule tables:
    input:
        rules.aggregate.output,
    output:
        table_files(),
    log:
        "logs/tables/tables.log",
    params:
        out=output_dir,
    localrule: True
    conda:
        "../../envs/report.yaml"
    shell:
        "cll tables --summary {input:q} --out {params.out:q} > {log} 2>&1"


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
    params:
        experiment=EXPERIMENT,
    localrule: True
    conda:
        "../../envs/report.yaml"
    shell:
        "cll figures --summary {input:q} --out {output:q} --track {params.experiment:q} > {log} 2>&1"
