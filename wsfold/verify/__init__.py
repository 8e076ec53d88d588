"""The gate: run the deployed graph and prove it computes what the checkpoint computes."""
