"""An example external process: reads its context, logs, reports a materialization, a check and a message.

Run it under the orchestrator with:
    pipes run --asset examples/hello --extras '{"rows": 3}' -- python examples/hello_pipes.py
"""

from pipes_ext import open_pipes


def main() -> None:
    with open_pipes() as pipes:
        rows = int(pipes.extras.get("rows", 3))
        pipes.log.info(f"hello from the external process, run {pipes.run_id}")
        data = [{"id": i, "square": i * i} for i in range(rows)]
        pipes.report_asset_materialization(
            metadata={
                "rows": len(data),
                "preview": {"raw_value": data[:5], "type": "json"},
                "source": {"raw_value": "https://example.com/data", "type": "url"},
            },
            data_version=str(sum(d["square"] for d in data)),
        )
        pipes.report_asset_check("rows_positive", passed=rows > 0, metadata={"rows": rows})
        pipes.report_custom_message({"squares": [d["square"] for d in data]})


if __name__ == "__main__":
    main()
