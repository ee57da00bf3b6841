"""The `kpq` command line (installed as `keras_powerquant.cli`)."""
