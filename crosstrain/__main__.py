from crosstrain.platform import run_cli

run_cli(as_module=True)
