"""An order saga across three services: inventory, payments and shipping."""
