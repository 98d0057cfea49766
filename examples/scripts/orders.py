"""An external step for the integration examples: logs, two materializations, two checks, a custom message.

It uses ``pipes_ext`` only, and runs unchanged under Dagster Pipes. Run by ``examples/prefect_flow.py`` and
``examples/concurrent_futures_runs.py`` with the assets ``warehouse/orders`` and ``warehouse/customers`` selected.
"""

from pipes_ext import open_pipes


def main() -> None:
    with open_pipes() as pipes:
        pipes.log.info("loading orders")
        orders = [{"id": i, "customer": i % 3, "amount": 12.5 * i} for i in range(1, 6)]
        customers = sorted({order["customer"] for order in orders})
        pipes.report_asset_materialization(
            asset_key="warehouse/orders",
            metadata={"rows": len(orders), "total": sum(order["amount"] for order in orders)},
            data_version=str(len(orders)),
        )
        pipes.report_asset_check(
            "amounts_positive", passed=all(order["amount"] > 0 for order in orders), asset_key="warehouse/orders"
        )
        pipes.report_asset_materialization(asset_key="warehouse/customers", metadata={"rows": len(customers)})
        # A failed check of severity WARN: reported, and the run still succeeds.
        pipes.report_asset_check(
            "all_customers_active", passed=False, severity="WARN", asset_key="warehouse/customers",
            metadata={"inactive": 1},
        )
        pipes.log.info(f"loaded {len(orders)} orders of {len(customers)} customers")
        pipes.report_custom_message({"orders": len(orders), "customers": len(customers)})


if __name__ == "__main__":
    main()
