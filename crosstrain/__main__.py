from crosstrain.entry import run_cli

run_cli(as_module=True)
