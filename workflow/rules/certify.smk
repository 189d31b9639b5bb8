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
    threads: threads_of
    resources:
        **resources_of("certify"),
    params:
        run=run_dir_of,
        experiment=EXPERIMENT,
        method=method_of,
    shell:
        "cll certify --run {params.run:q} --track {params.experiment:q} --method {params.method:q} > {log} 2>&1"
