# One job per runnable cell: certify its trained model on the test set at the run's certify_eps.


rule certify:
    input:
        rules.train.output,  # train.json: the run finished (certify reads model.pt beside it)
    output:
        f"{RUN_DIR}/certify.json",
    log:
        f"logs/certify/{CELL_PATH}.log",
    conda:
        "../../envs/train.yaml"
    threads: resource("cpus", 1)
    resources:
        **SITE_RESOURCES,
        gpu=resource("gpus", 0, most=1),
        runtime=resource("runtime", 60),
        mem_mb=resource("mem_mb", 4000),
        cpus_per_task=resource("cpus", 1),
    params:
        run=run_dir_of,
        experiment=EXPERIMENT,
        method=method_of,
    shell:
        "cll certify --run {params.run:q} --track {params.experiment:q} --method {params.method:q} > {log} 2>&1"
