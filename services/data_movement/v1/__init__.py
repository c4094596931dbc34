"""Generated code of services/data_movement/v1/data_movement.proto (`make proto`; never edit by hand)."""
