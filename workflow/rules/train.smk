# One job per runnable cell: train it into its run directory.
#
# The checkpoint model.pt is deliberately not an output: Snakemake deletes a job's outputs before
# the job runs and after it fails, which would throw away a run that stopped half-way (a Slurm
# time limit, a preempted node). Left alone, it lets the rerun of the same job (`cll train`
# with the same --out) resume where it stopped. train.json is written last, after the final
# model.pt, so it marks a finished run.


rule train:
    output:
        f"{RUN_DIR}/train.json",
    log:
        f"logs/train/{CELL_PATH}.log",
    conda:
        "../../envs/train.yaml"
    threads: resource("cpus", 1)
    resources:
        **SITE_RESOURCES,
        gpu=resource("gpus", 0),
        runtime=resource("runtime", 60),
        mem_mb=resource("mem_mb", 4000),
        cpus_per_task=resource("cpus", 1),
    params:
        launch=train_launcher,
        run=run_dir_of,
        set=set_args,
        experiment=EXPERIMENT,
        method=method_of,
    shell:
        # {params.launch}: `cll train`, or torchrun for a multi-GPU cell (common.smk: train_launcher)
        "{params.launch} --out {params.run:q} --track {params.experiment:q} --method {params.method:q}"
        " --set {params.set} > {log} 2>&1"
