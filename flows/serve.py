"""Both deployments served from this machine, with no work pool or worker: `python -m flows.serve`.
Same names and schedules as prefect.yaml; runs execute in subprocesses of this process."""

from prefect import serve

from bayeskd.flows import compare, pipeline

if __name__ == "__main__":
    serve(
        pipeline.to_deployment(name="nightly", cron="0 2 * * *"),
        compare.to_deployment(name="weekly-comparison", cron="0 3 * * 0",
                              parameters={"deployment": "bayeskd-pipeline/nightly"}),
    )
