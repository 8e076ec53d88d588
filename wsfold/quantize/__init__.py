"""int8: a static QDQ graph from the checkpoint, calibrated on the user's data, with a verdict that fails the build."""
